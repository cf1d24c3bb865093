"""Fingerprint each ingredient's weights (sha256 of its files) and refuse NaN or Inf values.

Both need one read of every byte, so they share the pass. The result is cached by file path, size and
modification time: a rerun on unchanged checkpoints reads nothing. A checkpoint streamed from the Hub
(`ranged.HubTensorSource`) is never read whole up front: its fingerprint comes from the Hub's file hashes, and its
tensors are checked for NaN/Inf as they are read.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from ..cache import JsonCache, cache_key
from ..checkpoints.ranged import HubTensorSource
from ..checkpoints.sources import SoupSources
from ..checkpoints.weights import TensorSource, averaged
from ..errors import NonFiniteWeightsError
from ..progress import progress_bar
from .compat import CompatibilityReport

logger = logging.getLogger(__name__)

_CHUNK = 16 * 1024 * 1024


def _file_identity(source: TensorSource) -> list:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in source.files]


def _sha256(paths, bar) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)  # releases the GIL: checkpoints hash in parallel
                bar.update(len(chunk))
    return digest.hexdigest()


def _non_finite_tensor(source: TensorSource) -> str | None:
    """The first float tensor holding NaN or Inf, if any. `aminmax` propagates NaN and shows ±Inf while reading
    each tensor once: several times faster than `isfinite(t).all()`, which writes a mask as large as the tensor."""
    stored = source.stored  # a LoRA adapter's own tensors, not its merged ones (they would re-read the base)
    for name in stored.keys():
        tensor = stored.get(name)
        if (
            averaged(tensor.dtype)
            and tensor.numel()
            and not torch.stack(torch.aminmax(tensor)).isfinite().all()
        ):
            return name
    return None


def fingerprint_sources(
    ids: list[str], sources: dict[str, TensorSource], cache: JsonCache, quiet: bool = False
) -> dict[str, str]:
    """sha256 of each source's weight files, checking that every float tensor is finite.

    Raises:
        NonFiniteWeightsError: a tensor holds NaN or Inf.
    """
    fingerprints: dict[str, str] = {}
    todo = []
    for cid in ids:
        if isinstance(sources[cid], HubTensorSource):
            fingerprints[cid] = sources[cid].fingerprint
            continue
        entry = cache.get(cache_key("fingerprint", _file_identity(sources[cid])))
        if entry is None:
            todo.append(cid)
        else:
            fingerprints[cid] = entry["sha256"]
            if entry["non_finite"]:
                _raise_non_finite(cid, entry["non_finite"])
    total = sum(p.stat().st_size for cid in todo for p in sources[cid].files)
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    try:
        with progress_bar(
            total=total, desc="Verifying weights", unit="B", unit_scale=True, quiet=quiet
        ) as bar:
            hashes = {cid: pool.submit(_sha256, sources[cid].files, bar) for cid in todo}
            for cid in todo:  # the finiteness checks run while the files hash
                bad_tensor = _non_finite_tensor(sources[cid])
                fingerprints[cid] = hashes[cid].result()
                cache.put(
                    cache_key("fingerprint", _file_identity(sources[cid])),
                    {"sha256": fingerprints[cid], "non_finite": bad_tensor},
                )
                if bad_tensor:
                    _raise_non_finite(cid, bad_tensor)
    finally:
        pool.shutdown(cancel_futures=True)
    return fingerprints


def _raise_non_finite(cid: str, tensor: str) -> None:
    raise NonFiniteWeightsError(
        f"{cid} has NaN or Inf values in {tensor}: the fine-tune diverged. Remove it from --candidates."
    )


def ingredient_fingerprints(
    report: CompatibilityReport, sources: SoupSources, cache: JsonCache, quiet: bool = False
) -> dict[str, str]:
    """Fingerprints of the base (under its id) and of every accepted candidate, including any head permutation."""
    base = sources.base_id
    readers = {base: sources.base, **{c.id: sources.candidates[c.id] for c in report.accepted}}
    fingerprints = fingerprint_sources(list(readers), readers, cache, quiet)
    for candidate in report.accepted:
        if candidate.kind == "lora":  # its merged model is the base plus the adapter
            fingerprints[candidate.id] += f"+base{fingerprints[base]}"
    permutations = dict(sources.alignment.permutations)
    if sources.alignment.base_permutation is not None:
        permutations[base] = sources.alignment.base_permutation
    for cid, permutation in permutations.items():
        fingerprints[cid] += f"+perm{permutation}"
    if sources.alignment.vocab is not None:  # the rows as aligned by token, which the scores depend on
        for cid, index in sources.alignment.vocab.row_maps.items():
            if cid in fingerprints:
                digest = hashlib.sha256(index.numpy().tobytes()).hexdigest()[:16]
                fingerprints[cid] += f"+vocab{digest}"
    return fingerprints
