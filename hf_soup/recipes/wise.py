"""WiSE-FT: interpolate between the base and a fine-tuned endpoint (Wortsman et al. 2022, arXiv 2109.01903).

θ(α) = (1 − α)·θ_base + α·θ_soup, where the endpoint θ_soup is itself a soup (greedy by default) or one model.
With one α the recipe just builds that mixture; with a sweep (`0:1:0.1`) it scores every α on the selection
split and keeps the best, breaking ties toward the larger α (the fine-tuned side).

The task head. A pretrained base usually has no head (`BertModel` vs `BertForSequenceClassification`), so there
is nothing to interpolate it with. The soup keeps the **fine-tuned endpoint's head** for every tensor the base
lacks, at every α: α = 0 is the base's body under the endpoint's head. These tensors carry their own weights in
`per_tensor_weights`, so the manifest says exactly what was done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError
from ..mixture import Ingredient, Mixture
from .base import RecipeResult, SoupRecipe, Step


def parse_alphas(spec: str | float) -> list[float]:
    """`"0.3"` → `[0.3]`; `"0:1:0.25"` → `[0.0, 0.25, 0.5, 0.75, 1.0]` (start:stop:step, stop included)."""
    text = str(spec).strip()
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        alphas = parts
    elif len(parts) == 3 and parts[2] > 0 and parts[1] >= parts[0]:
        count = math.floor((parts[1] - parts[0]) / parts[2] + 1e-9)
        alphas = [round(parts[0] + k * parts[2], 10) for k in range(count + 1)]
        if alphas[-1] < parts[1] - 1e-9:
            alphas.append(parts[1])
    else:
        alphas = []
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ConfigError(
            f"--alpha {text!r} is not a weight in [0, 1] or a sweep START:STOP:STEP such as 0:1:0.1."
        )
    return alphas


def interpolate(endpoint: Mixture, base: Ingredient, alpha: float, headless: Sequence[str]) -> Mixture:
    """(1 − α)·base + α·endpoint, with the endpoint's own weights on the tensors the base does not have."""
    ingredients = tuple(Ingredient(i.id, alpha * i.weight, i.revision) for i in endpoint.ingredients)
    head = {name: endpoint.weights() for name in headless}
    return Mixture("wise", ingredients, Ingredient(base.id, 1.0 - alpha, base.revision), head or None)


class WiseSoup(SoupRecipe):
    """Args:
    endpoint (`SoupRecipe`): the recipe that builds the fine-tuned endpoint.
    alphas (`list[float]`): the weight(s) of the endpoint to try.
    base (`Ingredient`): the shared initialisation.
    headless (`Sequence[str]`): tensors the base does not have (the task head).
    """

    def __init__(self, endpoint: SoupRecipe, alphas: list[float], base: Ingredient, headless: Sequence[str]):
        self.endpoint, self.alphas, self.base, self.headless = endpoint, alphas, base, list(headless)
        self.endpoint_mixture: Mixture | None = None
        self.curve: list[tuple[float, Mixture, float | None]] = []  # (alpha, mixture, selection score)

    @classmethod
    def name(cls) -> str:
        return "wise"

    @classmethod
    def pretty_name(cls) -> str:
        return "WiSE-FT soup"

    @classmethod
    def reference_url(cls) -> str:
        return "https://arxiv.org/abs/2109.01903"

    def cook(self, candidates, individual_scores, objective, revisions=None, tie_break=None) -> RecipeResult:
        inner = self.endpoint.cook(candidates, individual_scores, objective, revisions, tie_break)
        self.endpoint_mixture = inner.mixture
        trials = [interpolate(inner.mixture, self.base, alpha, self.headless) for alpha in self.alphas]
        if len(trials) == 1:
            self.curve = [(self.alphas[0], trials[0], None)]
            return RecipeResult(trials[0], inner.trajectory)
        trajectory = list(inner.trajectory)
        best, best_score = trials[0], None
        for alpha, trial in zip(self.alphas, trials):
            score = objective(trial, None)
            self.curve.append((alpha, trial, score))
            better = best_score is None or score >= best_score  # >=: ties go to the larger alpha
            if better:
                best, best_score = trial, score
            size = len(inner.mixture.ingredients)
            trajectory.append(Step(len(trajectory), f"alpha={alpha:g}", None, score, better, size))
        return RecipeResult(best, trajectory)

    @staticmethod
    def alpha_of(mixture: Mixture) -> float:
        return 1.0 - (mixture.base.weight if mixture.base else 0.0)
