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
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..errors import ConfigError
from ..mixture import Ingredient, Mixture
from .base import CurvePoint, RecipeContext, RecipeResult, SoupRecipe, Step, option

# The soups WiSE-FT can interpolate with the base (`--wise-of`).
WiseEndpoint = Literal["greedy", "uniform", "pruned"]
WISE_ENDPOINTS: tuple[str, ...] = get_args(WiseEndpoint)


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


CARD_SECTION = """### WiSE-FT

The soup interpolates the base and the {{ details.endpoint }} soup: θ = (1 − α)·θ_base + α·θ_soup, with
**α = {{ '%g' % details.alpha }}**{% if details.curve | length > 1 %}, the best of {{ details.curve | length }} values on the selection split{% endif %}.
Head: {{ details.head }}.

| α | selection {{ chosen_by }} | {% for split in m.soup.report %}report {{ split }} {{ metric }} | {% endfor %}
|---|---|{% for split in m.soup.report %}---|{% endfor %}
{% for p in details.curve -%}
| {{ '%g' % p.alpha }} | {{ '%.4f' % (p.selection_loss if chosen_by == 'loss' else p.selection[chosen_by]) }} | {% for split, values in p.report.items() %}{{ '%.4f' % values[metric] }} | {% endfor %}
{% endfor %}
"""


def interpolate(endpoint: Mixture, base: Ingredient, alpha: float, headless: Sequence[str]) -> Mixture:
    """(1 − α)·base + α·endpoint, with the endpoint's own weights on the tensors the base does not have."""
    ingredients = tuple(Ingredient(i.id, alpha * i.weight, i.revision) for i in endpoint.ingredients)
    head = {name: endpoint.weights() for name in headless}
    return Mixture("wise", ingredients, Ingredient(base.id, 1.0 - alpha, base.revision), head or None)


@dataclass(frozen=True)
class WiseOptions:
    alpha: str = option(
        "0:1:0.1",
        "WiSE-FT: the weight of the fine-tuned soup against the base, or a sweep START:STOP:STEP scored on the "
        "selection split.",
        metavar="A",
    )
    wise_of: WiseEndpoint = option("greedy", "WiSE-FT: the soup interpolated with the base.")

    def __post_init__(self) -> None:
        parse_alphas(self.alpha)
        if self.wise_of not in WISE_ENDPOINTS:
            raise ConfigError(f"--wise-of must be one of {', '.join(WISE_ENDPOINTS)}, got {self.wise_of!r}.")


class WiseSoup(SoupRecipe):
    """Args:
    endpoint (`SoupRecipe`): the recipe that builds the fine-tuned endpoint.
    alphas (`list[float]`): the weight(s) of the endpoint to try.
    base (`Ingredient`): the shared initialisation.
    headless (`Sequence[str]`): tensors the base does not have (the task head).
    """

    Options = WiseOptions
    builds = WISE_ENDPOINTS
    card_section = CARD_SECTION
    curve_plot = (
        "alpha",
        "alpha (weight of the fine-tuned soup)",
        "WiSE-FT: interpolating the base and the soup",
    )

    def __init__(self, endpoint: SoupRecipe, alphas: list[float], base: Ingredient, headless: Sequence[str]):
        self.endpoint, self.alphas, self.base, self.headless = endpoint, alphas, base, list(headless)

    @classmethod
    def name(cls) -> str:
        return "wise"

    @classmethod
    def pretty_name(cls) -> str:
        return "WiSE-FT soup"

    @classmethod
    def reference_url(cls) -> str:
        return "https://arxiv.org/abs/2109.01903"

    @classmethod
    def reference_title(cls) -> str:
        return "Wortsman et al. 2022, *Robust fine-tuning of zero-shot models*"

    @classmethod
    def from_config(cls, config, context: RecipeContext) -> WiseSoup:
        options = config.options(cls)
        return cls(
            context.build(options.wise_of), parse_alphas(options.alpha), context.base, context.headless
        )

    @classmethod
    def label(cls, soup_name: str, details: dict[str, Any] | None) -> str:
        return f"{soup_name} (alpha={details['alpha']:g} on the {details['endpoint']} soup)"

    def cook(self, candidates, individual_scores, objective, revisions=None, tie_break=None) -> RecipeResult:
        inner = self.endpoint.cook(candidates, individual_scores, objective, revisions, tie_break)
        trials = [interpolate(inner.mixture, self.base, alpha, self.headless) for alpha in self.alphas]
        if len(trials) == 1:
            curve = [(self.alphas[0], trials[0], None)]
            return self._result(trials[0], inner, list(inner.trajectory), curve)
        trajectory, curve = list(inner.trajectory), []
        best, best_score = trials[0], None
        for alpha, trial in zip(self.alphas, trials):
            score = objective(trial, None)
            curve.append((alpha, trial, score))
            better = best_score is None or score >= best_score  # >=: ties go to the larger alpha
            if better:
                best, best_score = trial, score
            size = len(inner.mixture.ingredients)
            trajectory.append(Step(len(trajectory), f"alpha={alpha:g}", None, score, better, size))
        return self._result(best, inner, trajectory, curve)

    def _result(self, chosen: Mixture, inner: RecipeResult, trajectory: list[Step], curve) -> RecipeResult:
        details = {
            "alpha": self.alpha_of(chosen),
            "endpoint": self.endpoint.name(),
            "endpoint_mixture": inner.mixture.to_dict(),
            "head": "the fine-tuned endpoint's head, at every alpha (the base has none of these labels)"
            if self.headless
            else "interpolated like the body: the base's own head has the same labels (rows aligned by name)",
        }
        points = [
            CurvePoint(f"alpha={alpha:g}", trial, score, {"alpha": alpha}) for alpha, trial, score in curve
        ]
        return RecipeResult(chosen, trajectory, details, points)

    @staticmethod
    def alpha_of(mixture: Mixture) -> float:
        return 1.0 - (mixture.base.weight if mixture.base else 0.0)
