"""A first data-free run's single pass: verify the inputs and write the soup from one read of each tensor.

A first run must verify what it merges: the sha256 of every file (duplicates count once), no NaN or Inf, and the
distances and angles to the base that keep candidates that were not fine-tuned from it out of the soup. Done as
separate passes, that is three reads of every input before the merge reads them a fourth time (two thirds of a
first 8 × 1.1 B merge). Here the soup is written *speculatively* while it is verified:

1. the files hash on a thread pool (hashlib releases the GIL) while the merge runs;
2. the recipe cooks on every compatible candidate, as if none will be dropped;
3. each tensor of each input is read once (`SoupSources.held`): a checking thread adds it to the diagnostics'
   float64 sums (a NaN or Inf shows in a task vector's squared norm; tensors outside them are checked with
   `aminmax`) while the merge mixes it from the same read and writes it into the staging folder;
4. the verdicts then decide as they always do (`stages.settled_stage`): a duplicate counts once, a flagged
   candidate stays out unless `--include-flagged`, `--strict` fails. Only when that changes the pool is the
   recipe cooked again and the weights rewritten (a second read, in the rare case).

Nothing is at `--output` until the whole folder is complete (`output.staged_soup_folder`): a failure at any point,
`--strict` included, leaves nothing there. A rerun finds every verdict cached and reads each candidate once anyway,
so it takes the plain path.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path

import torch

from ..background import OneInFlight
from ..candidates.compat import CompatibilityReport
from ..candidates.diagnostics import DiagnosticsSums
from ..candidates.verify import (
    FileHashes,
    cached_fingerprints,
    first_non_finite,
    raise_non_finite,
    verified_readers,
    with_alignment,
)
from ..checkpoints.sources import SoupSources
from ..checkpoints.weights import non_finite
from ..config import SoupConfig
from ..merge.materialize import soup_dtype
from ..merge.writer import WeightSettings, WrittenWeights, write
from ..recipes import recipe_class
from .stages import Checked, data_free_stage, diagnostics_key, settled_stage

logger = logging.getLogger(__name__)


def single_pass_inputs(config: SoupConfig, opened: tuple, writes: bool) -> tuple | None:
    """`(known fingerprints, sources to hash)` when this run verifies and writes in one pass, else None: a
    data-free merged soup that is written (`writes`), of full checkpoints, by a recipe that chooses without reading
    tensors, on inputs not verified before."""
    if not (
        writes
        and not config.scored
        and config.output_kind == "merged"
        and not recipe_class(config.recipe).reads_tensors
        # a LoRA adapter's merged tensors re-read the base
        and all(c.kind != "lora" for c in opened[0].accepted)
    ):
        return None
    return _first_run(opened)


def _first_run(opened: tuple) -> tuple | None:
    """The cache's fingerprints if some input was never verified: a local file not hashed before, or (a Hub
    checkpoint's fingerprint comes from the Hub) no diagnostics cached for these contents; else None."""
    compatibility, sources, cache = opened
    readers = verified_readers(compatibility, sources)
    known, todo = cached_fingerprints(list(readers), readers, cache)
    if todo:
        return known, todo
    fingerprints = with_alignment(compatibility, sources, known)
    return (known, todo) if cache.get(diagnostics_key(sources, fingerprints)) is None else None


class _Verifier:
    """Sees each tensor the merge reads (`materialize`'s `observe`) and checks it on the `checking` thread while the
    merge mixes it from the same reads: NaN/Inf, and the diagnostics' sums. One tensor is checked at a time (the
    next waits for it), so memory holds one tensor of every input, and the one before it, at most."""

    def __init__(
        self,
        compatibility: CompatibilityReport,
        sources: SoupSources,
        hashes: FileHashes,
        checking: OneInFlight,
    ):
        self.sources, self.hashes, self.checking = sources, hashes, checking
        self.readers = verified_readers(compatibility, sources)
        self.sums = DiagnosticsSums(sources)
        self.body = set(self.sums.names)
        vocab = sources.alignment.vocab  # rows beyond the base's vocabulary are in no task vector
        self.covered = self.body - set(vocab.tensors if vocab is not None else ())
        self.checked: dict[str, set[str]] = {cid: set() for cid in self.readers}

    def __call__(self, name: str, held: SoupSources) -> None:
        base_name = self.sources.alignment.base_names.get(name)
        # Read here, once, what the check reads: the merge then mixes from the same held tensors.
        if base_name is not None:
            held.base.get(base_name)
        for reader in held.candidates.values():
            reader.get(name)
        self.checking.submit(self._verify, name, base_name, held)

    def _verify(self, name: str, base_name: str | None, held: SoupSources) -> None:
        if name in self.body:  # the task vectors' squared norms show a NaN or Inf: no separate check
            for cid in self.sums.add(name, held):
                self._fail(cid, base_name if cid == held.base_id else name)
            if name in self.covered:
                self.checked[held.base_id].add(base_name)
                for cid in held.candidates:
                    self.checked[cid].add(name)
                return
        for cid, reader in held.candidates.items():
            self._check(cid, name, reader)
        if base_name is not None:
            self._check(held.base_id, base_name, held.base)

    def _check(self, cid: str, name: str, reader) -> None:
        self.checked[cid].add(name)
        if non_finite(reader.get(name)):
            self._fail(cid, name)

    def _fail(self, cid: str, name: str) -> None:
        if cid in self.hashes.todo:
            self.hashes.record(cid, name)  # cached, then raised: a rerun refuses it without reading
        raise_non_finite(cid, name)

    def finish(self) -> dict[str, str]:
        """Check the tensors the merge did not read (a backbone's head, a base's pooler), record every verdict and
        return the files' fingerprints."""
        self.checking.wait()
        for cid, reader in self.readers.items():
            if (name := first_non_finite(reader, skip=self.checked[cid])) is not None:
                self._fail(cid, name)
        for cid in self.hashes.todo:
            self.hashes.record(cid, None)
        return {cid: self.hashes.known[cid] for cid in self.readers}


def check_and_write(
    config: SoupConfig, opened: tuple, cached: tuple, staging: Path, quiet: bool = False
) -> tuple[Checked, WrittenWeights]:
    """Verify every input and write the data-free soup's weights into `staging` from the same reads.

    Args:
        opened (`tuple`): `stages.compatible_stage`'s `(compatibility, sources, cache)`.
        cached (`tuple`): `single_pass_inputs`' `(known fingerprints, sources to hash)`.

    Returns:
        `(Checked, WrittenWeights)`: the verdicts, as `stages.check_stage` gives them, and the weights written.
    """
    compatibility, sources, cache = opened
    dtype = soup_dtype(sources, config.dtype)
    readers = verified_readers(compatibility, sources)
    # One hashing thread, one checking thread, and the merge: torch's own thread pool would only oversubscribe
    # the cores (its idle threads spin), so each job runs its torch operations on one thread.
    with (
        FileHashes(list(readers), readers, cache, workers=1, cached=cached) as hashes,
        _one_torch_thread(),
        OneInFlight() as checking,
    ):
        everyone = Checked(compatibility, sources, {}, None, excluded={}, cache=cache, dtype=dtype)
        speculated = list(everyone.pool)  # `everyone` reads the report, which dropping a duplicate changes
        mixture = _mixture(config, everyone, quiet)
        verifier = _Verifier(compatibility, sources, hashes, checking)
        settings = WeightSettings(dtype, config.max_shard_size, config.base, config.lora_rank)
        weights = write(mixture, sources, "merged", staging, settings=settings, quiet=quiet, observe=verifier)
        files = verifier.finish()
    fingerprints = with_alignment(compatibility, sources, files)
    checked = settled_stage(config, opened, fingerprints, verifier.sums.result(), quiet=quiet)
    if checked.pool != speculated:  # a duplicate or a flagged candidate is out: the speculation missed
        logger.info(
            "Writing the soup again without the %d candidate(s) kept out.",
            len(speculated) - len(checked.pool),
        )
        for name in weights.files:
            (staging / name).unlink()
        settings = WeightSettings(checked.dtype, config.max_shard_size, config.base, config.lora_rank)
        weights = write(
            _mixture(config, checked, quiet),
            checked.sources,
            "merged",
            staging,
            settings=settings,
            quiet=quiet,
        )
    return checked, weights


@contextlib.contextmanager
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _mixture(config: SoupConfig, checked: Checked, quiet: bool):
    _, result = data_free_stage(config, checked, quiet)
    mixture = result.mixture
    return mixture if mixture.base is not None else replace(mixture, base=checked.base)
