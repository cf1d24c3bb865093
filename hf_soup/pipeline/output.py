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
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.constants import CONFIG_NAME

from ..candidates.compat import CompatibilityReport
from ..checkpoints.folders import atomic_folder
from ..config import SoupConfig
from ..errors import DiskSpaceError
from ..merge.materialize import output_bytes, plan_output
from ..merge.writer import WeightSettings, WrittenWeights, write
from ..reporting.card import write_model_card
from ..results import MANIFEST_NAME, SoupManifest, SoupSummary, WrittenFiles
from ..version import __version__

logger = logging.getLogger(__name__)

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


# An absolute POSIX path: a '/' at the start of a string or after a space, quote, '=', '(', ',' or '[' (so URLs and
# ratios such as 1/2 are left alone), followed by a name character.
_ABSOLUTE_PATH = re.compile(r"""(?<![^\s="'(,\[])/[\w.~-][^\s"']*""")


def relative_to_folder(path: str | Path, folder: Path) -> str:
    """`path` relative to the soup `folder`, always starting with `./` or `../`, so that it cannot be read as a
    Hub repo id."""
    relative = os.path.relpath(Path(path).absolute(), Path(folder).absolute())
    return relative if relative in (".", "..") or relative.startswith("../") else f"./{relative}"


def local_paths(compatibility: CompatibilityReport) -> list[str]:
    """The local ingredients and base as they were named (paths as typed, maybe relative to the current folder)."""
    named = [c for c in (compatibility.base, *compatibility.accepted) if c.source == "local"]
    return [str(c.id) for c in named] + [
        r.candidate_id for r in compatibility.rejected if Path(r.candidate_id).exists()
    ]


def portable(value: Any, folder: Path, local: Iterable[str] = ()) -> Any:
    """`value` (a manifest) with every local path rewritten relative to the soup `folder`: absolute paths wherever
    they occur, and the `local` names (paths as the user typed them) wherever a value or key is one.

    A soup folder is meant to be pushed: it must not carry the paths of the machine that made it (user names,
    temp folders). Relative to the folder, and marked as paths (`./`, `../`), local ingredients stay findable by
    `hf-soup reproduce` from any working folder, as long as the soup and its ingredients keep their places.
    """
    local = {name: relative_to_folder(name, folder) for name in local if not os.path.isabs(name)}
    return _portable(value, folder, local)


def _portable(value: Any, folder: Path, local: dict[str, str]) -> Any:
    if isinstance(value, str):
        if value in local:
            return local[value]
        return _ABSOLUTE_PATH.sub(lambda match: relative_to_folder(match.group(0), folder), value)
    if isinstance(value, dict):
        return {_portable(key, folder, local): _portable(item, folder, local) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(item, folder, local) for item in value]
    return value


def soup_config(compatibility: CompatibilityReport, dtype: str | None) -> dict[str, Any]:
    """The reference candidate's config, with the aligned label map and the dtype the tensors are stored in."""
    config = dict(compatibility.accepted[0].config)
    if compatibility.alignment.vocab is not None:
        config["vocab_size"] = compatibility.alignment.vocab.rows
    if compatibility.label_names is not None:
        config["id2label"] = {str(i): name for i, name in enumerate(compatibility.label_names)}
        config["label2id"] = {name: i for i, name in enumerate(compatibility.label_names)}
    if dtype:
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    return config


@contextlib.contextmanager
def staged_soup_folder(output: Path, config: SoupConfig, sources, dtype: torch.dtype) -> Iterator[Path]:
    """A staging folder beside `output` that becomes `output` only if the block finishes: nothing is ever
    half-written at `output`.

    Raises:
        DiskSpaceError: the weights do not fit on the output's disk (checked first), or the disk filled up while
            writing; either way nothing is left behind.
    """
    needed = output_bytes(plan_output(sources, dtype))
    _check_free_space(output, needed)
    # The staging folder is removed first (inner), then a full disk becomes one error (outer).
    with (
        _disk_full_is_one_error(output, needed),
        atomic_folder(output, overwrite=config.overwrite) as staging,
    ):
        yield staging


def write_soup_folder(
    output: Path,
    config: SoupConfig,
    summary: SoupSummary,
    checked,
    preprocessing: tuple,
    *,
    quiet: bool = False,
    overrides: dict[str, torch.Tensor] | None = None,
    staged: tuple[Path, WrittenWeights] | None = None,
) -> WrittenFiles:
    """Write the whole soup folder to `output`, atomically: weights, config, tokenizer or image processor,
    `soup.json`, model card and plots. Returns what was written; `summary` is not changed.

    Args:
        checked (`stages.Checked`): the compatible candidates, their sources and the soup's dtype.
        preprocessing (`tuple`): `(tokenizer or image processor, the folder it came from)`, or `(None, None)`.
        staged (`tuple`, *optional*): `(staging folder, weights)` when the weights are already written into an
            open `staged_soup_folder` (the single pass): the rest goes beside them, and the caller's block moves
            the folder into place.

    Raises:
        DiskSpaceError: see `staged_soup_folder`.
    """
    if staged is not None:
        return _complete(staged, config, summary, checked, preprocessing, Path(output))
    with staged_soup_folder(output, config, checked.sources, checked.dtype) as staging:
        settings = WeightSettings(checked.dtype, config.max_shard_size, config.base, config.lora_rank)
        weights = write(
            summary.mixture,
            checked.sources,
            config.output_kind,
            staging,
            settings=settings,
            quiet=quiet,
            overrides=overrides,
        )
        return _complete((staging, weights), config, summary, checked, preprocessing, Path(output))


def _complete(staged, config: SoupConfig, summary: SoupSummary, checked, preprocessing, output: Path):
    """Everything but the weights, beside them in the staging folder."""
    staging, weights = staged
    if config.output_kind != "lora":
        config_json = soup_config(checked.compatibility, str(checked.dtype).removeprefix("torch."))
        (staging / CONFIG_NAME).write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    preprocessor, preprocessor_dir = preprocessing
    if preprocessor is not None:  # the tokenizer, or the image processor
        preprocessor.save_pretrained(staging)
    manifest = SoupManifest(
        summary=replace(summary, lora=weights.lora),
        output=output.name,
        files=weights.files,
        tensor_sha256=weights.tensor_sha256,
        versions=package_versions(),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        tokenizer_from=str(preprocessor_dir) if preprocessor_dir else None,
    )
    local = local_paths(checked.compatibility)
    plots = _write_manifest_card_and_plots(staging, manifest, output.absolute(), local)
    return WrittenFiles(weights.files, weights.tensor_sha256, plots, weights.lora)


def _write_manifest_card_and_plots(
    staging: Path, manifest: SoupManifest, folder: Path, local: list[str]
) -> list[str]:
    """Plots, soup.json and the card, all from the portable manifest: nothing in the folder names this machine."""
    data = portable(json.loads(json.dumps(manifest.to_dict(), default=str)), folder, local)
    written = SoupManifest.from_dict(data)
    written.plots = []
    if written.summary.scored:  # matplotlib is imported only here: a plain merge has nothing to plot
        from ..reporting.plots import write_plots

        written.plots = write_plots(staging / "plots", written.summary)
    (staging / MANIFEST_NAME).write_text(json.dumps(written.to_dict(), indent=2, sort_keys=True) + "\n")
    write_model_card(staging, written)
    return written.plots


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
