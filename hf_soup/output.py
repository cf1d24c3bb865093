"""Write the soup folder atomically: weights, config, tokenizer or image processor, `soup.json`, model card and plots.

Everything is written into a temporary sibling folder, which is renamed into place only when complete. A failure
at any point leaves no partial output (and an existing folder untouched).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers.utils import CONFIG_NAME

from . import __version__
from .card import write_model_card
from .compat import CompatibilityReport
from .errors import DiskSpaceError, OutputExistsError
from .lora import write_adapter
from .materialize import materialize, output_bytes, plan_output, soup_dtype
from .mixture import Mixture
from .plots import write_plots

logger = logging.getLogger(__name__)

MANIFEST_NAME = "soup.json"
_PACKAGES = (
    "torch",
    "transformers",
    "datasets",
    "evaluate",
    "accelerate",
    "huggingface_hub",
    "peft",
    "safetensors",
)


def package_versions() -> dict[str, str]:
    versions = {"hf-soup": __version__}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


@contextlib.contextmanager
def atomic_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces `target` only if the block finishes without error."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"{target} already exists; pass --overwrite to replace it, or choose another --output."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        _apply_umask(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(retired / target.name)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _apply_umask(folder: Path) -> None:
    """mkdtemp and some writers create private (0700/0600) entries; give them the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# An absolute POSIX path: a '/' at the start of a string or after a space, quote, '=', '(', ',' or '[' (so URLs and
# ratios such as 1/2 are left alone), followed by a name character.
_ABSOLUTE_PATH = re.compile(r"""(?<![^\s="'(,\[])/[\w.~-][^\s"']*""")


def portable(value: Any, folder: Path) -> Any:
    """`value` (a manifest) with every absolute path rewritten relative to the soup `folder`.

    A soup folder is meant to be pushed: it must not carry the paths of the machine that made it (user names,
    temp folders). Relative to the folder, local ingredients stay findable by `hf-soup reproduce` as long as the
    soup and its ingredients keep their places.
    """
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda match: os.path.relpath(match.group(0), folder), value)
    if isinstance(value, dict):
        return {portable(key, folder): portable(item, folder) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(item, folder) for item in value]
    return value


def soup_config(compatibility: CompatibilityReport, dtype: str | None) -> dict[str, Any]:
    """The reference candidate's config, with the aligned label map and the dtype the tensors are stored in."""
    config = dict(compatibility.accepted[0].config)
    if compatibility.label_names is not None:
        config["id2label"] = {str(i): name for i, name in enumerate(compatibility.label_names)}
        config["label2id"] = {name: i for i, name in enumerate(compatibility.label_names)}
    if dtype:
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    return config


def write_soup_folder(
    output: Path,
    config,
    report: dict[str, Any],
    mixture: Mixture,
    compatibility: CompatibilityReport,
    sources,
    preprocessor,
    preprocessor_dir,
    quiet: bool = False,
    overrides=None,
) -> None:
    """Write the whole soup folder to `output` (atomically); also fills `report["files"]`.

    Raises:
        DiskSpaceError: the weights do not fit on the output's disk (checked first), or the disk filled up while
            writing; either way nothing is left behind.
    """
    dtype = soup_dtype(compatibility, sources, getattr(config, "dtype", "auto"))
    needed = output_bytes(plan_output(mixture, compatibility, sources, dtype))
    _check_free_space(output, needed)
    # The staging folder is removed first (inner), then a full disk becomes one error (outer).
    with (
        _disk_full_is_one_error(output, needed),
        atomic_folder(output, overwrite=config.overwrite) as staging,
    ):
        if config.output_kind == "lora":
            stats = write_adapter(staging, mixture, compatibility, sources, config.base, config.lora_rank)
            report["lora"] = {"rank": stats.rank, "truncation": stats.truncation}
        else:
            stats = materialize(
                mixture,
                compatibility,
                sources,
                staging,
                dtype=dtype,
                max_shard_size=config.max_shard_size,
                quiet=quiet,
                overrides=overrides,
            )
            config_json = soup_config(compatibility, str(dtype).removeprefix("torch."))
            (staging / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        if preprocessor is not None:  # the tokenizer, or the image processor
            preprocessor.save_pretrained(staging)
        manifest = {
            **report,
            "output": Path(output).name,
            "files": stats.files,
            "tensor_sha256": stats.tensor_sha256,
            "versions": package_versions(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "tokenizer_from": str(preprocessor_dir) if preprocessor_dir else None,
        }
        # Plots, soup.json and the card all read the portable manifest: nothing in the folder names this machine.
        manifest = portable(json.loads(json.dumps(manifest, default=str)), Path(output).absolute())
        plots = write_plots(staging / "plots", manifest) if report.get("soup") else []
        manifest["plots"] = plots
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        write_model_card(staging, manifest)
        report["files"] = stats.files
        report["plots"] = plots
        report["tensor_sha256"] = stats.tensor_sha256


@contextlib.contextmanager
def _disk_full_is_one_error(output: Path, needed: int) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise DiskSpaceError(
            f"The disk filled up while writing {output} (no partial folder was left): the soup needs about "
            f"{_size(needed)} plus a little for the card and plots, and {_size(_free(output))} is free. "
            "Free some space or choose another --output."
        ) from error


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def _free(output: Path) -> int:
    existing = next(p for p in [Path(output).absolute(), *Path(output).absolute().parents] if p.exists())
    return shutil.disk_usage(existing).free


def _check_free_space(output: Path, needed: int) -> None:
    free = _free(output)
    if free < needed * 1.02 + 16e6:  # the weights, plus room for the config, tokenizer, card and plots
        raise DiskSpaceError(
            f"Not enough disk space for {output}: the soup's weights need about {_size(needed)} and "
            f"{_size(free)} is free. Free some space or choose another --output."
        )
