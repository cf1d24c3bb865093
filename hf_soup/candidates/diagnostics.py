"""Will these candidates soup? Distances to the base and angles between fine-tuning directions.

For each candidate i, with θ_0 the base: the relative distance ‖θ_i − θ_0‖ / ‖θ_0‖, and for each pair the angle
between the task vectors (θ_i − θ_0) and (θ_j − θ_0), the paper's Figure 3 measure (more orthogonal fine-tunes
gave larger soup gains). Only tensors the base has are compared (the task head is new in every candidate).

A candidate that was not fine-tuned from the base (trained from scratch, or from another checkpoint) is far
from it: about √2·‖θ_0‖ for an independent initialisation of the same scale, where fine-tuning moves weights by
a small fraction of their norm. Such soups average to garbage (the paper's "harmful advice" experiment fell to
1% accuracy), so those candidates are flagged.

Everything streams: each tensor is read in row blocks of at most `block_elements` values per candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checkpoints.sources import SoupSources, TensorReader
from ..checkpoints.weights import averaged
from ..progress import progress_bar

# Entries per candidate in one float64 row block: 8 candidates' blocks (8 MB) stay in a 32 MB L3 cache while
# the N(N + 1)/2 dot products read them; with 1M-entry blocks every dot read memory (1.7x slower).
BLOCK_ELEMENTS = 1 << 17
# Farther than this from the base (relative to the base's norm) is not what fine-tuning produces.
MAX_RELATIVE_DISTANCE = 1.0
# Farther than this multiple of the median of the other candidates' distances is out of line with them.
OUT_OF_LINE = 4.0


@dataclass
class Diagnostics:
    """Distances and angles of a set of candidates, and the candidates that look like they share no start."""

    ids: list[str]
    relative_distance: dict[str, float]
    cosine: np.ndarray  # N × N, between task vectors
    base_norm: float
    tensors: int
    flagged: dict[str, str] = field(default_factory=dict)

    @property
    def angles(self) -> np.ndarray:
        """Pairwise angles in degrees."""
        return np.degrees(np.arccos(np.clip(self.cosine, -1.0, 1.0)))

    def to_dict(self) -> dict:
        return {
            "ids": self.ids,
            "relative_distance": self.relative_distance,
            "angle_degrees": np.round(self.angles, 4).tolist(),
            "cosine": np.round(self.cosine, 6).tolist(),
            "tensors_compared": self.tensors,
            "base_norm": self.base_norm,
            "flagged": self.flagged,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Diagnostics:
        return cls(
            ids=data["ids"],
            relative_distance=data["relative_distance"],
            cosine=np.asarray(data["cosine"]),
            base_norm=data.get("base_norm", 0.0),
            tensors=data["tensors_compared"],
            flagged=data["flagged"],
        )

    def restricted(self, ids: list[str]) -> Diagnostics:
        """The same measures for the candidates `ids` only (duplicates dropped), flagged among themselves."""
        index = [self.ids.index(cid) for cid in ids]
        distance = {cid: self.relative_distance[cid] for cid in ids}
        cosine = self.cosine[np.ix_(index, index)]
        return Diagnostics(list(ids), distance, cosine, self.base_norm, self.tensors, _flag(distance))

    def warnings(self) -> list[str]:
        return [f"{cid}: {reason}" for cid, reason in self.flagged.items()]


def _blocks(shape: tuple[int, ...], block_elements: int):
    rows = shape[0] if shape else 1
    per_row = max(1, math.prod(shape[1:])) if shape else 1
    step = max(1, block_elements // per_row)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _read_block(source: TensorReader, name: str, start: int, stop: int, scalar: bool) -> torch.Tensor:
    """Rows `start:stop` of a tensor, flattened, in its stored dtype."""
    return (source.get(name) if scalar else source.rows(name, start, stop)).reshape(-1)


class _DeltaBlocks:
    """`(base block, task-vector blocks θ_i − θ_0)` of one tensor at a time, in float64, streamed in row blocks.

    The float64 stack is allocated once and reused for every block: a fresh 8·N·`block_elements`-byte allocation
    per block cost more in page faults than the arithmetic (2.3x slower diagnostics at 1 B parameters).
    """

    def __init__(self, sources: SoupSources, ids: list[str], block_elements: int):
        self.sources, self.ids, self.block_elements = sources, ids, block_elements
        self._stack = torch.empty((len(ids), block_elements), dtype=torch.float64)

    def __call__(self, name: str, sources: SoupSources | None = None):
        """A head the base has too is read whole, with its rows aligned to the soup's label order. `sources`: the
        same sources read another way (held by the single pass); by default those given at creation."""
        sources, ids = sources or self.sources, self.ids
        base_name = sources.alignment.base_names[name]
        vocab = sources.alignment.vocab
        if vocab is not None and name in vocab.tensors:  # aligned rows, over the base's tokens only
            yield from self._vocabulary_deltas(name, sources)
            return
        if name in sources.alignment.head_tensors:
            base = sources.read_base(name).to(torch.float64).reshape(-1)
            yield (
                base,
                torch.stack([sources.read(cid, name).to(torch.float64).reshape(-1) - base for cid in ids]),
            )
            return
        shape = sources.base.shape(base_name)
        for start, stop in _blocks(shape, self.block_elements):
            base = _read_block(sources.base, base_name, start, stop, not shape).to(torch.float64)
            deltas = self._deltas(base.numel())
            for row, cid in zip(deltas, ids):  # converted and subtracted in place: no temporaries
                row.copy_(_read_block(sources.candidates[cid], name, start, stop, not shape))
                row.sub_(base)
            yield base, deltas

    def _deltas(self, numel: int) -> torch.Tensor:
        """The reused float64 stack, `numel` wide (grown once if one row is longer than a block)."""
        if numel > self._stack.shape[1]:
            self._stack = torch.empty((len(self.ids), numel), dtype=torch.float64)
        return self._stack[:, :numel]

    def _vocabulary_deltas(self, name: str, sources: SoupSources):
        """Embedding rows aligned by token (`vocab.py`): a row a candidate lacks counts as unchanged, and rows the
        base lacks (`--vocab union`) have no task vector. The aligned tables are held in their stored dtype and
        streamed in float64 row blocks, as other tensors are."""
        rows = sources.alignment.vocab.present(sources.base_id)
        base = sources.read(sources.base_id, name)[rows]
        tables = []
        for cid in self.ids:
            table = sources.read(cid, name)
            missing = sources.missing_rows(cid, name)
            if missing is not None:
                table[missing] = sources.read(sources.base_id, name)[missing]
            tables.append(table[rows])
        for start, stop in _blocks(tuple(base.shape), self.block_elements):
            block = base[start:stop].to(torch.float64).reshape(-1)
            deltas = self._deltas(block.numel())
            for row, table in zip(deltas, tables):
                row.copy_(table[start:stop].reshape(-1))
                row.sub_(block)
            yield block, deltas


def _gram(deltas: torch.Tensor) -> np.ndarray:
    """`deltas @ deltas.T` in float64, exactly symmetric (the upper triangle mirrored). One matrix product of a
    block that stays in cache: 1.5x faster than the N(N + 1)/2 dot products on one thread, as fast on two."""
    gram = torch.mm(deltas, deltas.T).numpy()
    return np.triu(gram) + np.triu(gram, 1).T


def shared_tensors(sources: SoupSources) -> list[str]:
    """The float tensors the base has too (candidate names): where task vectors θ_i − θ_0 exist."""
    alignment = sources.alignment
    return [n for n, b in alignment.base_names.items() if averaged(sources.base.dtype(b))]


def tensor_cosines(
    sources: SoupSources, ids: list[str], block_elements: int = BLOCK_ELEMENTS, quiet: bool = False
):
    """Per tensor the base has, the mean pairwise cosine between the candidates' task vectors θ_i − θ_0 (each
    tensor flattened), streamed: what Model Stock needs. A zero task vector counts as orthogonal (cosine 0)."""
    names = shared_tensors(sources)
    upper = np.triu_indices(len(ids), k=1)
    delta_blocks = _DeltaBlocks(sources, ids, block_elements)
    cosines = {}
    with progress_bar(total=len(names), desc="Task-vector angles", unit="tensor", quiet=quiet) as bar:
        for name in names:
            gram = np.zeros((len(ids), len(ids)))
            for _, deltas in delta_blocks(name):
                gram += _gram(deltas)
            norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
            cosine = gram / np.maximum(np.outer(norms, norms), 1e-12)
            cosines[name] = float(np.clip(cosine[upper], -1.0, 1.0).mean())
            bar.update(1)
    return cosines


class DiagnosticsSums:
    """The running sums behind `Diagnostics`: the float64 Gram matrix of the task vectors and the base's squared
    norm, added to one tensor at a time, so that a pass that reads the tensors for another reason (the single pass
    that also merges them) can diagnose from the same reads.

    Args:
        sources (`SoupSources`): the base and the candidates to diagnose.
        block_elements (`int`): the row blocks' size per candidate (float64).
    """

    def __init__(self, sources: SoupSources, block_elements: int = BLOCK_ELEMENTS):
        self.ids, self.base_id = list(sources.candidates), sources.base_id
        # The body only: a head the base has too may list its labels in another order (it is permuted when souped).
        self.names = [n for n in shared_tensors(sources) if n not in sources.alignment.head_tensors]
        self.gram = np.zeros((len(self.ids), len(self.ids)))
        self.base_sq = 0.0
        self._blocks = _DeltaBlocks(sources, self.ids, block_elements)

    def add(self, name: str, sources: SoupSources | None = None) -> list[str]:
        """Add tensor `name` (one of `names`), read through `sources` (by default the ones given at creation).

        Returns who holds NaN or Inf in it: the base, else the candidates whose task vector is not finite (a NaN or
        Inf makes its squared norm NaN or Inf; float32 and bfloat16 squares cannot overflow float64). Rows a
        candidate has beyond the base's vocabulary are not in its task vector, so they are not covered.
        """
        bad: list[str] = []
        for base, deltas in self._blocks(name, sources):
            base_sq, gram = float(base @ base), _gram(deltas)
            if not math.isfinite(base_sq):
                return [self.base_id]
            bad += [cid for cid, value in zip(self.ids, np.diag(gram)) if not math.isfinite(value)]
            self.base_sq += base_sq
            self.gram += gram
        return list(dict.fromkeys(bad))

    def result(self) -> Diagnostics:
        return diagnostics_from_sums(self.ids, self.gram, self.base_sq, len(self.names))


def diagnostics_from_sums(ids: list[str], gram: np.ndarray, base_sq: float, tensors: int) -> Diagnostics:
    """Distances, angles and flags from the task vectors' Gram matrix and the base's squared norm."""
    squared = np.clip(np.diag(gram), 0.0, None)
    norms = np.sqrt(squared)
    denominator = np.outer(norms, norms)
    cosine = np.divide(gram, denominator, out=np.eye(len(ids)), where=denominator > 0)
    np.fill_diagonal(cosine, 1.0)  # exactly, not 1 − rounding
    base_norm = math.sqrt(base_sq)
    distance = {cid: float(norms[i] / base_norm) if base_norm else float("inf") for i, cid in enumerate(ids)}
    diagnostics = Diagnostics(ids, distance, cosine, base_norm, tensors)
    diagnostics.flagged = _flag(distance)
    return diagnostics


def diagnose(
    sources: SoupSources,
    block_elements: int = BLOCK_ELEMENTS,
    quiet: bool = False,
) -> Diagnostics:
    """Distances to the base and pairwise angles between task vectors, over the tensors the base has."""
    sums = DiagnosticsSums(sources, block_elements)
    with progress_bar(total=len(sums.names), desc="Diagnostics", unit="tensor", quiet=quiet) as bar:
        for name in sums.names:
            sums.add(name)
            bar.update(1)
    return sums.result()


def _flag(distance: dict[str, float]) -> dict[str, str]:
    flagged = {}
    for cid, value in distance.items():
        others = [v for c, v in distance.items() if c != cid]
        typical = float(np.median(others)) if others else None
        if value > MAX_RELATIVE_DISTANCE:
            flagged[cid] = (
                f"‖θ−θ_base‖/‖θ_base‖ = {value:.3f}, above {MAX_RELATIVE_DISTANCE:g}: it does not look fine-tuned "
                "from this base (a different initialisation?). Souping it will likely fail."
            )
        elif typical is not None and typical > 0 and value > OUT_OF_LINE * typical:
            flagged[cid] = (
                f"‖θ−θ_base‖/‖θ_base‖ = {value:.3f}, {value / typical:.1f}× the other candidates' median "
                f"({typical:.3f}): it may not share their initialisation."
            )
    return flagged


FULL_MATRIX_UP_TO = 8  # candidates; beyond that the table summarises each row (the heatmap has them all)


def diagnostics_table(diagnostics: Diagnostics) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: each candidate's relative distance, then its angle to every other candidate.

    With more than `FULL_MATRIX_UP_TO` candidates, the angles are summarised per row (nearest, mean, farthest), so
    the table stays readable at any N.
    """
    count = len(diagnostics.ids)
    short = [f"#{i + 1}" for i in range(count)]
    angles = diagnostics.angles
    full = count <= FULL_MATRIX_UP_TO
    angle_headers = [f"∠{s}" for s in short] if full else ["nearest ∠", "mean ∠", "farthest ∠"]
    headers = ["#", "candidate", "‖θ−θ₀‖/‖θ₀‖", *angle_headers, "flag"]
    rows = []
    for i, cid in enumerate(diagnostics.ids):
        others = [angles[i, j] for j in range(count) if j != i]
        if full:
            cells = ["" if i == j else f"{angles[i, j]:.1f}°" for j in range(count)]
        else:
            cells = [f"{min(others):.1f}°", f"{np.mean(others):.1f}°", f"{max(others):.1f}°"]
        flag = "NOT A FINE-TUNE?" if cid in diagnostics.flagged else ""
        rows.append([short[i], cid, f"{diagnostics.relative_distance[cid]:.4f}", *cells, flag])
    return headers, rows
