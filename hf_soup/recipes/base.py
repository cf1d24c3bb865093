"""The interface every recipe implements: candidates and an objective in, a Mixture (and its details) out.

A recipe is one file in `hf_soup/recipes/` plus one line in the registry (`recipes/__init__.py`). It declares its
options as a frozen dataclass (`Options`, fields made with `option()`): the CLI gets one flag per field, `cook()` and
`SoupConfig(recipe_options=...)` take them by name, and `soup.json` records them. It builds itself from the config
(`config.options(cls)`) and a `RecipeContext`, and returns its own record in `RecipeResult.details`; it may also
describe that record in the model card (`card_section`) and in the results table (`label`). Recipes never touch
tensors: a recipe that learns through the live model gets a trainer from the context.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError
from ..mixture import Ingredient, Mixture

SOUPS_PAPER = "https://arxiv.org/abs/2203.05482"

# Scores a mixture on the selection split; higher is better (scorers negate losses). The second argument is the
# score the trial must reach to be accepted: a scorer may stop early and return None once it provably cannot.
Objective = Callable[[Mixture, "float | None"], "float | None"]


def option(default: Any, help: str, **cli: Any) -> Any:
    """A field of a recipe's `Options`: its default, and its `--flag`'s help (plus argparse settings such as
    `metavar`). The flag's type and choices come from the field's annotation (a `Literal` gives the choices)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class NoOptions:
    """The options of a recipe that has none."""


def at_least(value: float, minimum: float, flag: str) -> None:
    """Refuse `--flag value` below `minimum` (the usual check of a recipe option)."""
    if value < minimum:
        raise ConfigError(f"{flag} must be at least {minimum:g}, got {value}.")


@dataclass(frozen=True)
class Step:
    """One trial a recipe made, for the trajectory plot and the manifest."""

    step: int
    action: str  # "seed", "add", "remove" or "start"
    candidate: str | None
    score: float | None  # None: stopped early, provably below the bar
    accepted: bool
    size: int
    stopped_early: bool = False


@dataclass(frozen=True)
class CurvePoint:
    """A trial the recipe wants shown on the report splits too (WiSE-FT's α sweep): the pipeline scores it and
    stores it, with `fields`, in `details["curve"]`."""

    label: str
    mixture: Mixture
    selection_value: float | None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeResult:
    """What a recipe returns: the mixture it chose, the trials it made on the way, and its own record."""

    mixture: Mixture
    trajectory: list[Step] = field(default_factory=list)
    details: dict[str, Any] | None = None  # stored in soup.json under the recipe's name
    curve: list[CurvePoint] = field(default_factory=list)


@dataclass(frozen=True)
class Fold:
    """One half of the selection split: each candidate's own score on it, an objective that scores a mixture on it
    (higher is better, like `Objective`), and `build(name)`, which builds a recipe whose training data (the learned
    soup's) is this half alone."""

    name: str
    individual_scores: dict[str, float]
    objective: Objective
    build: Callable[[str], SoupRecipe] | None = None


@dataclass
class RecipeContext:
    """What the pipeline offers a recipe that needs more than scores.

    Args:
        base (`Ingredient`): the shared initialisation (weight 0).
        headless (`list[str]`): float tensors the base does not have (the task head).
        build (`Callable[[str], SoupRecipe]`): builds another recipe by name, from the same config (an endpoint).
        mixing_trainer (`Callable`, *optional*): `options -> MixingTrainer`, the live model's gradient machinery;
            `None` without data, or when the data is not hf-soup's own encoding (a user's Trainer scores).
        task_vector_cosines (`Callable`, *optional*): `ids -> {tensor: mean pairwise cosine}` of the candidates'
            task vectors θ_i − θ_0 over each tensor the base has (streamed; data-free recipes such as Model Stock).
        folds (`Callable[[], list[Fold]]`, *optional*): builds two disjoint halves of the selection split, each with its own candidate
            scores and objective, for recipes that confirm a choice on data they did not choose on (`auto`);
            `None` without hf-soup's own encoding of the data.
        quiet (`bool`): no progress bars.
        candidate_order (`list[str]`): the soup's candidates in the order `--candidates` named them (globs
            expanded in sorted order), which per-model options such as `--weights 0.6,0.4` follow.
    """

    base: Ingredient
    headless: list[str] = field(default_factory=list)
    build: Callable[[str], SoupRecipe] | None = None
    mixing_trainer: Callable[[Any], Any] | None = None
    task_vector_cosines: Callable[[list[str]], dict[str, float]] | None = None
    folds: Callable[[], list[Fold]] | None = None
    quiet: bool = False
    candidate_order: list[str] = field(default_factory=list)


class SoupRecipe(ABC):
    """A soup recipe. It only picks ingredients and weights; it never touches tensors."""

    # Jinja shown in the model card after the results table, with the manifest as `m` and the recipe's record
    # as `details`; `chosen_by` and `metric` are the selection and primary metrics.
    card_section: ClassVar[str] = ""
    # A recipe that needs no data runs without --task / --dataset (its objective is then None).
    needs_data: ClassVar[bool] = True
    # For a recipe that returns a curve: (the curve field on the x axis, its label, the plot's title).
    curve_plot: ClassVar[tuple[str, str, str] | None] = None
    # The recipe's options: a frozen dataclass whose fields (made with `option()`) are its flags. Its
    # `__post_init__` refuses bad values, before any work.
    Options: ClassVar[type] = NoOptions
    # A data-free recipe that reads the candidates' tensors to choose its mixture (Model Stock's angles) cannot
    # write the soup in the same pass that verifies them (`pipeline/single_pass.py`).
    reads_tensors: ClassVar[bool] = False
    # The fewest compatible candidates the recipe can soup (SLERP from the base needs one).
    min_candidates: ClassVar[int] = 2
    # The recipes this one builds through `RecipeContext.build` (their options apply to this run too).
    builds: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def reference_title(cls) -> str:
        return "Wortsman et al. 2022, *Model soups*"

    @classmethod
    def from_config(cls, config, context: RecipeContext) -> SoupRecipe:
        """Build the recipe from its options (`config.options(cls)`) and what the pipeline offers."""
        return cls()

    @classmethod
    def label(cls, soup_name: str, details: dict[str, Any] | None) -> str:
        """The soup's name in the results table."""
        return soup_name

    @classmethod
    @abstractmethod
    def name(cls) -> str: ...

    @classmethod
    @abstractmethod
    def pretty_name(cls) -> str: ...

    @classmethod
    def reference_url(cls) -> str:
        """The paper the recipe comes from: the card cites it."""
        return SOUPS_PAPER

    @abstractmethod
    def cook(
        self,
        candidates: Sequence[str],
        individual_scores: dict[str, float],
        objective: Objective,
        revisions: dict[str, str | None] | None = None,
        tie_break: dict[str, float] | None = None,
    ) -> RecipeResult:
        """Choose a mixture of `candidates`.

        Args:
            candidates (`Sequence[str]`): candidate ids.
            individual_scores (`dict[str, float]`): each candidate's own selection score (higher is better).
            objective (`Callable[[Mixture], float]`): scores a trial mixture on the selection split.
            revisions (`dict[str, str | None]`, *optional*): pinned revisions to record in the mixture.
            tie_break (`dict[str, float]`, *optional*): lower wins among equal scores (the selection loss).
        """


def rank(
    candidates: Sequence[str], individual_scores: dict[str, float], tie_break: dict[str, float] | None = None
) -> list[str]:
    """Candidates from best to worst selection score.

    Ties go to the lower `tie_break` value (the selection loss), then to the smaller id, so the order is
    always well defined.
    """
    tie_break = tie_break or {}
    if not individual_scores:  # no data (a data-free recipe): the ids' order
        return sorted(candidates)
    return sorted(candidates, key=lambda cid: (-individual_scores[cid], tie_break.get(cid, 0.0), cid))
