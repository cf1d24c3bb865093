"""Auto: choose the recipe on data it was not built on, then build it on the whole selection split.

Picking the best of several recipes by their selection scores would overfit the selection split: every recipe
already maximised that score. So each contender is judged by **cross-fitting**:

1. The selection split is cut into two seeded, disjoint halves, A and B.
2. Each contender is built on A (A's candidate scores and objective) and scored on B, then built on B and
   scored on A. Its confirmation score is the mean of the two (in the selection metric, higher is better).
3. The contender with the best confirmation score is rebuilt on the whole selection split; that is the soup.

The contenders are uniform, greedy, pruned, Model Stock and WiSE-FT (with `--alpha` and `--wise-of`), the learned
soup with `--auto-learned` (off by default: it is trained through the live model on each half, and again if
chosen; on a half it trains on that half only), mergekit's methods over stated grids (`--no-auto-methods` leaves
them out):

- task arithmetic on the mean task vector, θ_0 + λ·mean_i(θ_i − θ_0), for λ in `LAMBDA_GRID` (λ = 1 is the
  uniform soup, already a contender; λ > 1 extrapolates along the mean fine-tuning direction);
- TIES and DARE-TIES (normalised, λ = 1, DARE's masks seeded by `--seed`) at each density in `DENSITY_GRID`;

and the **best individual** itself (on each half: the candidate best on that half): so `auto` never chooses a soup
that did worse than picking one model, on data neither was chosen on. Ties go to the earlier contender in that list.
More contenders give the halves more chances to be fooled by one that fits them by luck; the report and card say
how many were tried, and `scripts/reproduce_llm_soup.py` measures auto with and without the methods.
The report split is never looked at; the usual paired interval against the best individual is reported on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..mixture import Mixture
from .base import Fold, RecipeContext, RecipeResult, SoupRecipe, option, rank
from .dare_ties import DareTiesSoup
from .task_arithmetic import TaskArithmeticSoup
from .task_vectors import SparseOptions, TaskArithmeticOptions
from .ties import TiesSoup

CONTENDERS = ("uniform", "greedy", "pruned", "stock", "wise")
BEST_INDIVIDUAL = "best individual"
LAMBDA_GRID = (0.5, 1.5, 2.0)  # task arithmetic on the mean task vector
DENSITY_GRID = (0.2, 0.5, 0.8)  # TIES and DARE-TIES


def method_contenders(context: RecipeContext, seed: int) -> dict[str, SoupRecipe]:
    """mergekit's methods over the stated grids, by contender name (`"ties density=0.2"`)."""
    contenders: dict[str, SoupRecipe] = {
        f"task_arithmetic λ={lam:g}": TaskArithmeticSoup(
            TaskArithmeticOptions(lambda_=lam, normalize=True), context
        )
        for lam in LAMBDA_GRID
    }
    for density in DENSITY_GRID:
        contenders[f"ties density={density:g}"] = TiesSoup(SparseOptions(density=str(density)), context)
    for density in DENSITY_GRID:
        options = SparseOptions(density=str(density), normalize=True)
        contenders[f"dare_ties density={density:g}"] = DareTiesSoup(options, context, seed)
    return contenders


CARD_SECTION = """### Auto: the recipe chosen on held-out halves

Each contender was built on one half of the selection split and scored on the other, both ways (cross-fitting);
the one with the best mean confirmation {{ chosen_by }} of the {{ details.contenders | length }} contenders tried was
rebuilt on the whole selection split. The report split was not used.

| contender | confirmation {{ chosen_by }} (mean) | built on A, scored on B | built on B, scored on A |
|---|---|---|---|
{% for name, c in details.contenders.items() -%}
| {{ '**' ~ name ~ '** (chosen)' if name == details.chosen else name }} | {{ '%.4f' % c.shown }} | {{ '%.4f' % c.shown_folds[0] }} | {{ '%.4f' % c.shown_folds[1] }} |
{% endfor %}
"""


@dataclass(frozen=True)
class AutoOptions:
    auto_learned: bool = option(
        False,
        "Auto: the learned soup is a contender too (slow: it is trained on each half, and again on the whole "
        "selection split if chosen).",
    )
    auto_methods: bool = option(
        True,
        "Auto: task arithmetic (λ in 0.5, 1.5, 2 on the mean task vector), TIES and DARE-TIES (density in 0.2, "
        "0.5, 0.8) are contenders too; --no-auto-methods leaves them out.",
    )


class AutoSoup(SoupRecipe):
    """Args:
    contenders (`dict[str, SoupRecipe]`): the recipes to choose from, in order of preference on ties.
    folds (`list[Fold]`): the two halves of the selection split.
    loss (`bool`): the selection metric is the loss (objectives hold it negated; shown as a loss).
    """

    Options = AutoOptions
    builds = (*CONTENDERS, "learned")
    card_section = CARD_SECTION

    def __init__(self, contenders: dict[str, SoupRecipe], folds: list[Fold], loss: bool = False):
        self.contenders, self.folds, self.loss = contenders, folds, loss
        # Each contender that uses data as built for each half (a learned soup trains on that half); a data-free
        # one (uniform, Model Stock, a method at a grid point) is the same on both.
        self.on_fold = {
            fold.name: {
                name: fold.build(name) if fold.build and recipe.needs_data else recipe
                for name, recipe in contenders.items()
            }
            for fold in folds
        }

    @classmethod
    def name(cls) -> str:
        return "auto"

    @classmethod
    def pretty_name(cls) -> str:
        return "Auto soup"

    @classmethod
    def from_config(cls, config, context: RecipeContext) -> AutoSoup:
        if context.folds is None:
            raise ConfigError(
                "--recipe auto confirms each recipe on half of hf-soup's own encoding of the selection split; "
                "with cook(trainer=...) choose a recipe, or pass the data as dataset= instead of a trainer."
            )
        options = config.options(cls)
        names = (*CONTENDERS, "learned") if options.auto_learned else CONTENDERS
        contenders = {name: context.build(name) for name in names}
        if options.auto_methods:
            contenders.update(method_contenders(context, config.seed))
        return cls(contenders, context.folds(), loss=config.selection_metric == "loss")

    @classmethod
    def label(cls, soup_name: str, details: dict[str, Any] | None) -> str:
        tried = details.get("tried", len(details["contenders"]))  # soup.json of hf-soup 0.4.0 has no "tried"
        return f"{soup_name} ({details['chosen']} chosen of {tried} contenders on held-out halves)"

    def cook(self, candidates, individual_scores, objective, revisions=None, tie_break=None) -> RecipeResult:
        confirmation = {
            name: self._confirm(
                lambda fold, n=name: self.on_fold[fold.name][n].cook, candidates, revisions, tie_break
            )
            for name in self.contenders
        }
        confirmation[BEST_INDIVIDUAL] = self._confirm(
            lambda _fold: self._best_single, candidates, revisions, tie_break
        )
        chosen = max(
            confirmation, key=lambda name: sum(confirmation[name])
        )  # first of equals: the preference
        if chosen == BEST_INDIVIDUAL:
            result = self._best_single(candidates, individual_scores, objective, revisions, tie_break)
        else:
            result = self.contenders[chosen].cook(
                candidates, individual_scores, objective, revisions, tie_break
            )
        details = {
            "chosen": chosen,
            "why": f"the best mean confirmation score of {len(confirmation)} contenders, each built on one half "
            "of the selection split and scored on the other",
            "contenders": {name: self._record(folds) for name, folds in confirmation.items()},
            "tried": len(confirmation),
            "chosen_details": result.details,
        }
        return RecipeResult(result.mixture, result.trajectory, details, result.curve)

    def _confirm(self, build, candidates, revisions, tie_break) -> list[float]:
        """Built on each half, scored on the other: `[built on A → B, built on B → A]`. `build(fold)` is the
        contender's `cook` for that half."""
        scores = []
        for built_on, judged_on in ((self.folds[0], self.folds[1]), (self.folds[1], self.folds[0])):
            cook = build(built_on)
            result = cook(candidates, built_on.individual_scores, built_on.objective, revisions, tie_break)
            scores.append(judged_on.objective(result.mixture, None))
        return scores

    @staticmethod
    def _best_single(
        candidates, individual_scores, objective, revisions=None, tie_break=None
    ) -> RecipeResult:
        best = rank(candidates, individual_scores, tie_break)[0]
        return RecipeResult(Mixture.uniform("single", [best], revisions))

    def _record(self, folds: list[float]) -> dict[str, Any]:
        """Confirmation scores as objectives (higher is better) and as shown (a loss as a loss)."""
        sign = -1.0 if self.loss else 1.0
        mean = sum(folds) / len(folds)
        return {
            "confirmation": mean,
            "folds": folds,
            "shown": sign * mean,
            "shown_folds": [sign * f for f in folds],
        }
