"""`hf-soup reproduce`: rebuild a soup from its `soup.json` and check every output tensor's sha256.

The manifest pins every Hub ingredient (and the base) to a commit SHA, so a candidate that changes on the Hub
after the run does not change the rebuild. The expected result is bit-exact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download, snapshot_download

from ..candidates.compat import check_compatibility
from ..candidates.hub import hub_errors, is_hub_pattern, split_revision
from ..checkpoints.lora import ADAPTER_WEIGHTS
from ..checkpoints.weights import TensorSource
from ..errors import HubError, ReproduceMismatchError
from ..merge.materialize import soup_dtype, tensor_sha256
from ..merge.writer import WeightSettings, write
from ..mixture import Ingredient, Mixture
from ..results import FORMAT_VERSION, MANIFEST_NAME, SoupManifest, SoupSummary


@dataclass
class ReproduceResult:
    """Per tensor group: how many tensors matched the manifest, and which did not."""

    target: str
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatched

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "ok": self.ok, "groups": self.groups, "mismatched": self.mismatched}


def load_manifest(target: str) -> SoupManifest:
    """`soup.json` from a local soup folder, or from a Hub repo (`org/name[@rev]`); any format version."""
    folder = Path(target)
    if folder.is_dir():
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise HubError(f"{target} has no {MANIFEST_NAME}; it was not written by hf-soup.")
        return _parsed(json.loads(path.read_text()), target)
    if not is_hub_pattern(target):
        raise HubError(f"{target} is neither a soup folder nor a Hub repo id ('org/name[@rev]').")
    repo_id, revision = split_revision(target)
    with hub_errors(f"{repo_id}: {MANIFEST_NAME}"):
        data = json.loads(Path(hf_hub_download(repo_id, MANIFEST_NAME, revision=revision)).read_text())
    return _parsed(data, target)


def _parsed(data: dict[str, Any], target: str) -> SoupManifest:
    version = data.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise HubError(
            f"{target}'s {MANIFEST_NAME} has format_version {version}, newer than this hf-soup reads "
            f"({FORMAT_VERSION}): upgrade hf-soup (`pip install -U hf-soup`)."
        )
    return SoupManifest.from_dict(data)


def published_hashes(target: str) -> dict[str, str]:
    """sha256 of every tensor the soup folder (or Hub repo) actually holds."""
    folder = Path(target)
    if not folder.is_dir():
        repo_id, revision = split_revision(target)
        with hub_errors(f"Downloading {target}"):
            folder = Path(
                snapshot_download(repo_id, revision=revision, allow_patterns=["*.safetensors", "*.json"])
            )
    adapter = (folder / ADAPTER_WEIGHTS).is_file() and not (folder / "model.safetensors").is_file()
    source = TensorSource(folder, weights_name=ADAPTER_WEIGHTS if adapter else None)
    return {name: tensor_sha256(tensor) for name, tensor in source.items()}


def tensor_group(name: str) -> str:
    """`bert.encoder.layer.3.attention.self.query.weight` → `bert.encoder.layer.3`; `classifier.bias` → `classifier`."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def _pinned(ingredient) -> str:
    return f"{ingredient.id}@{ingredient.revision}" if ingredient.revision else ingredient.id


def _locator(target: str) -> Callable[[str], str]:
    """Where a local ingredient is now. Soup folders record local paths relative to themselves, starting with
    `./` or `../`: those are looked up there, whatever the current folder, and never on the Hub. Manifests of
    hf-soup 0.4.0 and earlier may hold paths as typed (relative to the folder the soup was made in): a path that
    exists relative to the soup folder is used, anything else is taken as typed."""
    folder = Path(target) if Path(target).is_dir() else None

    def locate(cid: str) -> str:
        if cid.startswith(("./", "../")):
            if folder is None:
                raise ReproduceMismatchError(
                    f"{target}'s soup.json names a local folder, {cid}, relative to the soup folder it was made "
                    "in; download the soup and run `hf-soup reproduce` on that folder, with its ingredients in "
                    "the same places."
                )
            located = os.path.normpath(folder.absolute() / cid)
            if not os.path.exists(located):
                raise ReproduceMismatchError(
                    f"The ingredient {cid} is not where soup.json says, relative to {target} ({located} does "
                    "not exist). Put it back there, or rebuild the soup."
                )
            return located
        if folder is not None and not os.path.isabs(cid) and (folder / cid).exists():
            return os.path.normpath(folder.absolute() / cid)
        return cid

    return locate


def reproduce(target: str, quiet: bool = False) -> ReproduceResult:
    """Rebuild the soup described by `target`'s manifest; check the rebuild *and* the published weights against
    the manifest's tensor hashes.

    Args:
        target (`str`): a soup folder, or a Hub repo id with an optional `@revision`.

    Raises:
        ReproduceMismatchError: some ingredients cannot be used again.
    """
    manifest = load_manifest(target)
    summary, locate = manifest.summary, _locator(target)
    mixture = summary.mixture.renamed(locate)
    options = summary.config or {}
    report, sources = check_compatibility(
        _pinned(mixture.base) if mixture.base else locate(summary.base),
        _candidates_in_order(summary, mixture, locate),
        allow_pickle=bool(options.get("allow_pickle")),
        label_order=summary.compatibility.get("label_names"),
        vocab=options.get("vocab") or "base",
        soup=options.get("soup") or "full",
    )
    missing = sorted(set(mixture.ids()) - {c.id for c in report.accepted})
    if missing:
        reasons = "; ".join(f"{r.candidate_id}: {r.reason}" for r in report.rejected)
        raise ReproduceMismatchError(
            f"Ingredients could not be used again: {', '.join(missing)} ({reasons})."
        )
    kind = options.get("output_kind") or "merged"
    settings = WeightSettings(
        dtype=soup_dtype(sources, summary.dtype),  # as written ("auto" for a soup.json without a dtype)
        base_id=locate(options.get("base") or summary.base),
        lora_rank=options.get("lora_rank"),
    )
    with tempfile.TemporaryDirectory(prefix="hf-soup-reproduce-") as scratch:
        rebuilt = write(
            mixture, sources, kind, Path(scratch), settings=settings, candidates=report.accepted, quiet=quiet
        )
    # BatchNorm statistics re-estimated on data (--recalibrate-bn) and a backbone soup's head (fitted on data, or
    # one candidate's) are not a mixture of the weights: the published ones are checked against the manifest, and
    # the rebuild (which writes the mixture) is not compared there.
    recalibrated = {
        *(summary.batchnorm or {}).get("tensors", []),
        *(summary.backbone or {}).get("head_tensors", []),
    }
    return _compare(
        target, manifest.tensor_sha256, rebuilt.tensor_sha256, published_hashes(target), recalibrated
    )


def _candidates_in_order(summary: SoupSummary, mixture: Mixture, locate: Callable[[str], str]) -> list[str]:
    """The ingredients, pinned; the reference candidate first, as when the soup was made (non-float tensors are
    copied from it). hf-soup 0.3.0 did not record the reference: the mixture's order is used."""
    pinned = {i.id: _pinned(i) for i in mixture.ingredients}
    reference = summary.compatibility.get("reference")
    if reference is None:
        return list(pinned.values())
    first = Ingredient(locate(reference["id"]), 0.0, reference.get("revision"))
    return [_pinned(first), *(c for i, c in pinned.items() if i != first.id)]


def _compare(target: str, expected, rebuilt, published, recalibrated: set[str]) -> ReproduceResult:
    """Per tensor group: both the rebuild and the published weights must match the manifest."""
    result = ReproduceResult(target)
    for name in sorted(set(expected) | set(rebuilt) | set(published)):
        group = result.groups.setdefault(tensor_group(name), {"tensors": 0, "matched": 0})
        group["tensors"] += 1
        mine = expected.get(name) if name in recalibrated else rebuilt.get(name)
        if expected.get(name) == mine == published.get(name):
            group["matched"] += 1
        else:
            result.mismatched.append(name)
    for group in result.groups.values():
        group["ok"] = group["matched"] == group["tensors"]
    return result
