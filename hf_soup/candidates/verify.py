"""Fingerprint each ingredient's weights (sha256 of its files) and refuse NaN or Inf values.

Both need one read of every byte, so they share the pass. The result is cached by file path, size and
modification time: a rerun on unchanged checkpoints reads nothing. A checkpoint streamed from the Hub
(`ranged.HubTensorSource`) is never read whole up front: its fingerprint comes from the Hub's file hashes, and its
tensors are checked for NaN/Inf as they are read.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

from ..cache import JsonCache, cache_key
from ..checkpoints.ranged import HubTensorSource
from ..checkpoints.sources import SoupSources
from ..checkpoints.weights import TensorSource, averaged, non_finite
from ..errors import NonFiniteWeightsError
from ..progress import progress_bar
from .compat import CompatibilityReport

logger = logging.getLogger(__name__)

_CHUNK = 16 * 1024 * 1024


def _file_identity(source: TensorSource) -> list:
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in source.files]


def _sha256(paths, bar) -> str:
    """sha256 of the files' bytes, read through a memory map: the page cache's pages are hashed where they are,
    with no copy (hashlib releases the GIL, so files hash while other threads work)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if not size:
                continue
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
                for start in range(0, size, _CHUNK):
                    digest.update(view[start : start + _CHUNK])
                    # Unmap the hashed pages (they stay in the page cache): resident memory holds one chunk, not
                    # the whole file, while it hashes.
                    mapped.madvise(mmap.MADV_DONTNEED, start, min(_CHUNK, size - start))
                    bar.update(min(_CHUNK, size - start))
    return digest.hexdigest()


def first_non_finite(source: TensorSource, skip: set[str] = frozenset()) -> str | None:
    """The first float tensor of `source`'s files (not in `skip`: already checked) holding NaN or Inf, if any."""
    stored = source.stored  # a LoRA adapter's own tensors, not its merged ones (they would re-read the base)
    for name in stored.keys():
        if name not in skip and averaged(stored.dtype(name)) and non_finite(stored.get(name)):
            return name
    return None


def cached_fingerprints(
    ids: list[str], sources: dict[str, TensorSource], cache: JsonCache
) -> tuple[dict[str, str], list[str]]:
    """`(known, todo)`: the fingerprints known without reading (cached by file identity, or a Hub checkpoint's from
    the Hub), and the sources whose files were never hashed.

    Raises:
        NonFiniteWeightsError: a cached verdict says a tensor holds NaN or Inf.
    """
    known: dict[str, str] = {}
    todo: list[str] = []
    for cid in ids:
        if isinstance(sources[cid], HubTensorSource):
            known[cid] = sources[cid].fingerprint
            continue
        entry = cache.get(cache_key("fingerprint", _file_identity(sources[cid])))
        if entry is None:
            todo.append(cid)
            continue
        known[cid] = entry["sha256"]
        if entry["non_finite"]:
            raise_non_finite(cid, entry["non_finite"])
    return known, todo


class FileHashes:
    """The sha256 of each source's weight files, started on a thread pool at once (hashlib releases the GIL, so
    files hash while the caller reads their tensors) and cached by file identity with the finiteness verdict.

    A file already in the cache is not hashed again; a Hub-streamed source has its fingerprint from the Hub.

    Args:
        ids (`list[str]`): the sources to fingerprint, in order.
        sources (`dict[str, TensorSource]`): their readers.
        cache (`JsonCache`): where verdicts are kept.
        workers (`int`, *optional*): hashing threads; by default one per core.
        cached (`tuple`, *optional*): `cached_fingerprints`' answer, when the caller already asked the cache.
    """

    def __init__(
        self,
        ids: list[str],
        sources: dict[str, TensorSource],
        cache: JsonCache,
        quiet: bool = True,
        workers: int | None = None,
        cached: tuple[dict[str, str], list[str]] | None = None,
    ):
        self.sources, self.cache = sources, cache
        known, todo = cached or cached_fingerprints(ids, sources, cache)
        self.known, self.todo = dict(known), list(todo)
        total = sum(p.stat().st_size for cid in self.todo for p in sources[cid].files)
        self._bar = progress_bar(
            total=total, desc="Verifying weights", unit="B", unit_scale=True, quiet=quiet
        )
        self._pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
        self._hashes = {cid: self._pool.submit(_sha256, sources[cid].files, self._bar) for cid in self.todo}

    def record(self, cid: str, bad_tensor: str | None) -> str:
        """Wait for `cid`'s hash and cache it with its verdict; raise if a tensor is not finite."""
        sha256 = self.known[cid] = self._hashes[cid].result()
        self.cache.put(
            cache_key("fingerprint", _file_identity(self.sources[cid])),
            {"sha256": sha256, "non_finite": bad_tensor},
        )
        if bad_tensor:
            raise_non_finite(cid, bad_tensor)
        return sha256

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._bar.close()

    def __enter__(self) -> FileHashes:
        return self

    def __exit__(self, *error) -> None:
        self.close()


def fingerprint_sources(
    ids: list[str], sources: dict[str, TensorSource], cache: JsonCache, quiet: bool = False
) -> dict[str, str]:
    """sha256 of each source's weight files, checking that every float tensor is finite.

    Raises:
        NonFiniteWeightsError: a tensor holds NaN or Inf.
    """
    with FileHashes(ids, sources, cache, quiet) as hashes:
        for cid in hashes.todo:  # the finiteness checks run while the files hash
            hashes.record(cid, first_non_finite(sources[cid]))
        return {cid: hashes.known[cid] for cid in ids}


def raise_non_finite(cid: str, tensor: str) -> None:
    raise NonFiniteWeightsError(
        f"{cid} has NaN or Inf values in {tensor}: the fine-tune diverged. Remove it from --candidates."
    )


def ingredient_fingerprints(
    report: CompatibilityReport, sources: SoupSources, cache: JsonCache, quiet: bool = False
) -> dict[str, str]:
    """Fingerprints of the base (under its id) and of every accepted candidate, including any head permutation."""
    readers = verified_readers(report, sources)
    return with_alignment(report, sources, fingerprint_sources(list(readers), readers, cache, quiet))


def verified_readers(report: CompatibilityReport, sources: SoupSources) -> dict[str, TensorSource]:
    """The readers whose files are fingerprinted: the base (under its id), then each accepted candidate."""
    return {sources.base_id: sources.base, **{c.id: sources.candidates[c.id] for c in report.accepted}}


def with_alignment(
    report: CompatibilityReport, sources: SoupSources, files: dict[str, str]
) -> dict[str, str]:
    """The files' fingerprints, extended by what else the soup's tensors depend on: a LoRA candidate's base, a
    head permutation and the vocabulary rows."""
    fingerprints = dict(files)
    base = sources.base_id
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
