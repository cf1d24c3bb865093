"""The merge methods that are not a weighted average: task arithmetic, TIES, DARE and SLERP, one tensor at a time.

A mixture names its method in `Mixture.method` (the recipes in `recipes/task_vectors.py` and `recipes/slerp.py`
make it); `materialize.mix_tensor` hands such a mixture's float tensors here. With θ_0 the base, τ_i = θ_i − θ_0 the
task vectors and w_i the ingredients' weights, every task-vector method computes, elementwise and in float32:

    δ_i = w_i · sparsify(τ_i)                     magnitude (TIES: the top `density` of |τ_i|) or random (DARE)
    m_i = [sign(δ_i) = sign(Σ_j δ_j)]             the sign election (TIES, DARE-TIES); m_i = 1 without it
    θ   = θ_0 + λ · Σ m_i δ_i / (Σ m_i w_i if normalize else 1)

as mergekit's `generalized_task_arithmetic` does (a zero divisor counts as 1), so the tensors match within float32
rounding. DARE drops each entry with probability 1 − density and rescales the kept ones by 1/density, as the DARE
paper does (mergekit rescales to keep each task vector's L1 norm instead). Its masks come from a generator seeded
by (seed, tensor name, ingredient position): the same seed gives the same soup, on any machine and any thread count.

BatchNorm's running statistics are not weights: a rescaled (DARE) or extrapolated (λ > 1) variance can go negative,
so under a task-vector method they are the weights' normalised average, Σ w_i θ_i / Σ w_i, as a soup's are.

The sign election needs the sum of all δ_j before any is kept, so it reads the candidates twice; memory holds a
few float32 tensors of one tensor's size, never one per candidate. Tensors the base lacks (a new task head), and
embedding rows of tokens the base lacks (`--vocab union`), are the weights' normalised average over the
ingredients that have them; a row an ingredient lacks is no opinion (δ_i = 0 there).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from ..checkpoints.sources import SoupSources
from ..errors import ConfigError
from ..mixture import Mixture

TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
SPARSIFICATION = {"ties": "magnitude", "dare_linear": "random", "dare_ties": "random"}
SIGN_ELECTION = {"ties", "dare_ties"}
RUNNING_STATISTICS = ("running_mean", "running_var")  # BatchNorm's: averaged, never task-vector merged


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries largest in magnitude (at least one), as mergekit ranks them."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * delta.numel()))
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[torch.argsort(delta.abs().reshape(-1), descending=True)[:k]] = True
    return keep.reshape(delta.shape)


def dare_generator(seed: int, name: str, position: int) -> torch.Generator:
    """The generator of one ingredient's DARE mask on one tensor: independent of everything else in the run."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability `density` (uniform draws below it: the same on every CPU)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density


def _sparsified(
    method: dict[str, Any], delta: torch.Tensor, cid: str, position: int, name: str
) -> torch.Tensor:
    how = SPARSIFICATION.get(method["name"])
    if how is None:
        return delta
    density = float(method["density"][cid])
    if how == "magnitude":
        return delta * magnitude_mask(delta, density)
    kept = delta * random_mask(delta, density, dare_generator(int(method["seed"]), name, position))
    return kept / density if 0 < density < 1 else kept


class _TaskVectors:
    """The weighted, sparsified task vectors δ_i of one tensor, made on demand (read again for a second pass)."""

    def __init__(self, mixture: Mixture, sources: SoupSources, name: str):
        self.mixture, self.sources, self.name = mixture, sources, name
        self.base = sources.read_base(name).to(torch.float32)
        self.pairs = [(i, ing.id, ing.weight) for i, ing in enumerate(mixture.ingredients) if ing.weight != 0]
        self.live = 0
        self.new_rows = sources.missing_rows(sources.base_id, name)  # `--vocab union`'s tokens the base lacks

    def __iter__(self):
        for position, cid, weight in self.pairs:
            tensor = self.sources.read(cid, self.name)
            delta = tensor.to(torch.float32) - self.base
            missing = self.sources.missing_rows(cid, self.name)
            if missing is not None:  # a token this ingredient lacks: it has no opinion on that row
                delta[missing] = 0
            if self.new_rows is not None:  # no task vector where the base has no row (set apart, below)
                delta[self.new_rows] = 0
            self.live = max(self.live, 4 * _nbytes(self.base) + _nbytes(tensor))
            del tensor
            yield weight, _sparsified(self.mixture.method, delta, cid, position, self.name) * weight


def task_vector_tensor(mixture: Mixture, sources: SoupSources, name: str) -> tuple[torch.Tensor, int]:
    """θ_0 + λ·(the merged task vectors) for one tensor, in float32, and the bytes held to make it."""
    method = mixture.method
    vectors = _TaskVectors(mixture, sources, name)
    base = vectors.base
    if method["name"] in SIGN_ELECTION:
        total = torch.zeros_like(base)
        for _, delta in vectors:
            total += delta
        elected = torch.where(total >= 0, 1.0, -1.0)
        del total
        mixed, divisor = torch.zeros_like(base), torch.zeros_like(base)
        for weight, delta in vectors:
            agrees = torch.sign(delta) == elected
            mixed += delta * agrees
            divisor += weight * agrees
        divisor[divisor == 0] = 1
    else:
        mixed = torch.zeros_like(base)
        for _, delta in vectors:
            mixed += delta
        divisor = torch.tensor([weight for _, _, weight in vectors.pairs], dtype=torch.float32).sum()
        divisor = torch.ones_like(divisor) if divisor.abs() < 1e-8 else divisor
    if method["normalize"]:
        mixed /= divisor
    if method["lambda"] != 1:
        mixed *= method["lambda"]
    made = base + mixed
    if vectors.new_rows is not None:
        _average_new_rows(made, vectors)
    return made, vectors.live


def _average_new_rows(made: torch.Tensor, vectors: _TaskVectors) -> None:
    """Rows of tokens the base lacks (`--vocab union`) have no task vector: like a tensor the base lacks, they are
    the weights' normalised average over the ingredients that have the token."""
    rows = vectors.new_rows
    total = torch.zeros((int(rows.sum()), *made.shape[1:]), dtype=torch.float32)
    weights = torch.zeros(total.shape[0], dtype=torch.float32)
    for _, cid, weight in vectors.pairs:
        missing = vectors.sources.missing_rows(cid, vectors.name)
        has = torch.ones(total.shape[0], dtype=torch.bool) if missing is None else ~missing[rows]
        owned = vectors.sources.read(cid, vectors.name)[rows].to(torch.float32)
        total += owned * (weight * has).unsqueeze(1)
        weights += weight * has
    owned = weights != 0  # a row nobody has keeps base + λ·0: the base's row
    made[rows.nonzero().squeeze(1)[owned]] = total[owned] / weights[owned].unsqueeze(1)


_BLOCK = 1 << 20  # entries per float64 block of SLERP's sums


def _cosine(a: torch.Tensor, b: torch.Tensor, eps: float) -> float:
    """cos Ω between two tensors as vectors, summed in float64 over blocks (float32 sums over millions of entries
    drift by 1e-3 on some CPUs); a norm under `eps` counts as 1, as in mergekit (a zero tensor is orthogonal)."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    aa = bb = ab = 0.0
    for start in range(0, flat_a.numel(), _BLOCK):
        x, y = flat_a[start : start + _BLOCK].double(), flat_b[start : start + _BLOCK].double()
        aa, bb, ab = aa + float(x @ x), bb + float(y @ y), ab + float(x @ y)
    norm_a, norm_b = math.sqrt(aa), math.sqrt(bb)
    return min(1.0, max(-1.0, ab / ((norm_a if norm_a > eps else 1.0) * (norm_b if norm_b > eps else 1.0))))


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical interpolation from `v0` (t = 0) to `v1` (t = 1) of two whole tensors, in float32 (float64 in,
    float64 out) with the angle from float64 sums; nearly parallel or antiparallel tensors (|cos| >
    `dot_threshold`) interpolate linearly."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.to(dtype), v1.to(dtype)
    dot = _cosine(a, b, eps) if a.numel() else 1.0
    if abs(dot) > dot_threshold:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) / math.sin(theta)) * a + (math.sin(t * theta) / math.sin(theta)) * b


def slerp_tensor(mixture: Mixture, sources: SoupSources, name: str) -> tuple[torch.Tensor, int]:
    """SLERP from the first ingredient to the second; with one ingredient, from the base to it (mergekit's form:
    its `base_model` is the t = 0 end), keeping the ingredient's own tensors where the base has none."""
    ends = [ingredient.id for ingredient in mixture.ingredients]
    if len(ends) == 1:
        if name not in sources.alignment.base_names:
            only = sources.read(ends[0], name).to(torch.float32)
            return only, _nbytes(only)
        ends = [mixture.base.id, ends[0]]
    v0, v1 = sources.read(ends[0], name), sources.read(ends[1], name)
    mixed = slerp(float(mixture.method["t"]), v0, v1)
    return mixed, _nbytes(v0) + _nbytes(v1) + 3 * _nbytes(mixed)


def method_tensor(mixture: Mixture, sources: SoupSources, name: str) -> tuple[torch.Tensor, int] | None:
    """One float tensor of a mixture made by a merge method, and the bytes held to make it; `None` for a tensor
    the base lacks under a task-vector method (the caller averages it with the normalised weights)."""
    method = mixture.method["name"]
    if method == "slerp":
        return slerp_tensor(mixture, sources, name)
    if method not in TASK_VECTOR_METHODS:
        raise ConfigError(
            f"Unknown merge method {method!r} in the mixture; this hf-soup knows slerp and "
            f"{', '.join(TASK_VECTOR_METHODS)}."
        )
    if name not in sources.alignment.base_names:
        return None
    if name.rsplit(".", 1)[-1] in RUNNING_STATISTICS:
        return _normalised_average(mixture, sources, name)
    return task_vector_tensor(mixture, sources, name)


def _normalised_average(mixture: Mixture, sources: SoupSources, name: str) -> tuple[torch.Tensor, int]:
    """Σ w_i θ_i / Σ w_i of one tensor, in float32."""
    pairs = [(ing.id, ing.weight) for ing in mixture.ingredients if ing.weight != 0]
    total = sum(weight for _, weight in pairs)
    mixed = None
    for cid, weight in pairs:
        tensor = sources.read(cid, name).to(torch.float32) * (weight / total)
        mixed = tensor if mixed is None else mixed.add_(tensor)
    return mixed, 2 * _nbytes(mixed)
