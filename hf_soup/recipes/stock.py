"""Model Stock (Jang et al. 2024, arXiv 2403.19522): average the fine-tunes, then interpolate back toward the
pretrained weights, tensor by tensor, by how much the fine-tuning directions agree. No data is needed.

For each tensor the base has, with θ_0 the base and θ_1..θ_N the fine-tunes:

    cos θ = the mean pairwise cosine between the task vectors (θ_i − θ_0), each tensor flattened
    t     = N·cos θ / (1 + (N − 1)·cos θ)
    θ     = t·mean(θ_i) + (1 − t)·θ_0

Per tensor, as mergekit's `model_stock` computes it (the paper's code takes one angle per layer's weight; one
angle for the whole model would let the embeddings, with most of the parameters, decide for every layer). Two
choices the paper leaves open: with N > 2 the angle is the mean of the pairwise cosines (as mergekit), and t is
clamped to [0, 1]: task vectors at or beyond 90° (cos θ ≤ 0, which fine-tunes from one start do not produce)
keep the base rather than extrapolate away from it. Tensors the base lacks (a new task head) are averaged
(t = 1). The ratios go in `soup.json` (`stock`) and the card.
"""

from __future__ import annotations

import statistics
from typing import Any

from ..errors import ConfigError
from ..mixture import Ingredient, Mixture
from .base import RecipeContext, RecipeResult, SoupRecipe, rank

CARD_SECTION = """### Model Stock

Each tensor the base has is interpolated from the average of the {{ details.n }} fine-tunes back toward the base,
θ = t·mean(θ_i) + (1 − t)·θ_base, with t = N·cos θ / (1 + (N − 1)·cos θ) and cos θ the mean pairwise cosine of
the fine-tuning directions in that tensor: across {{ details.t | length }} tensors, t ranges from
{{ '%.4f' % details.summary.t_min }} to {{ '%.4f' % details.summary.t_max }} (median {{ '%.4f' % details.summary.t_median }}).
Tensors the base lacks (the task head) are averaged. Every ratio is in `soup.json` (`stock.t`, `stock.cos`).
"""


def interpolation_ratio(cos: float, n: int) -> float:
    """Model Stock's t for `n` fine-tunes whose task vectors have mean pairwise cosine `cos`, clamped to [0, 1]."""
    if cos <= 0:
        return 0.0
    return min(1.0, n * cos / (1 + (n - 1) * cos))


class StockSoup(SoupRecipe):
    """Args:
    base (`Ingredient`): the pretrained weights.
    cosines (`Callable`): `ids -> {tensor: mean pairwise cosine of the task vectors}` (from the pipeline).
    """

    card_section = CARD_SECTION
    needs_data = False
    reads_tensors = True  # the task vectors' angles, per tensor

    def __init__(self, base: Ingredient, cosines):
        self.base, self.cosines = base, cosines

    @classmethod
    def name(cls) -> str:
        return "stock"

    @classmethod
    def pretty_name(cls) -> str:
        return "Model Stock soup"

    @classmethod
    def reference_url(cls) -> str:
        return "https://arxiv.org/abs/2403.19522"

    @classmethod
    def reference_title(cls) -> str:
        return "Jang et al. 2024, *Model Stock*"

    @classmethod
    def from_config(cls, config, context: RecipeContext) -> StockSoup:
        return cls(context.base, context.task_vector_cosines)

    @classmethod
    def label(cls, soup_name: str, details: dict[str, Any] | None) -> str:
        return f"{soup_name} (median t={details['summary']['t_median']:.3f})"

    def cook(self, candidates, individual_scores, objective, revisions=None, tie_break=None) -> RecipeResult:
        ids = rank(candidates, individual_scores, tie_break)
        if len(ids) < 2:
            raise ConfigError(
                "--recipe stock needs at least 2 fine-tunes: it measures the angle between their directions."
            )
        cosines = self.cosines(ids)
        ratios = {name: interpolation_ratio(cos, len(ids)) for name, cos in cosines.items()}
        per_tensor = {
            name: {**{cid: t / len(ids) for cid in ids}, self.base.id: 1.0 - t} for name, t in ratios.items()
        }
        mixture = Mixture.uniform(self.name(), ids, revisions)
        mixture = Mixture(self.name(), mixture.ingredients, self.base, per_tensor)
        values = list(ratios.values())
        summary = {"t_min": min(values), "t_max": max(values), "t_median": statistics.median(values)}
        details = {"n": len(ids), "t": ratios, "cos": cosines, "summary": summary}
        return RecipeResult(mixture, [], details)
