"""Soup recipes. Each one returns a `Mixture`; only the learned soup touches tensors (through the live model)."""

from __future__ import annotations

from typing import get_args

from ..errors import ConfigError
from ..mixture import Recipe
from .base import Objective, RecipeResult, SoupRecipe, Step, rank
from .greedy import GreedySoup
from .learned import LearnedOptions, LearnedSoup, MixingTrainer
from .pruned import PrunedSoup
from .uniform import UniformSoup
from .wise import WiseSoup, parse_alphas

RECIPES: dict[str, type[SoupRecipe]] = {
    cls.name(): cls for cls in (UniformSoup, GreedySoup, PrunedSoup, LearnedSoup, WiseSoup)
}
assert set(RECIPES) == set(get_args(Recipe))
# Recipes that need only scores (no live model, no base): the ones `get_recipe` builds on its own.
SCORE_ONLY = ("uniform", "greedy", "pruned")


def get_recipe(name: str, passes: int = 1) -> SoupRecipe:
    """The score-only recipe called `name`, e.g. `get_recipe("greedy")`. `wise` and `learned` are built by `cook`."""
    if name not in SCORE_ONLY:
        raise ConfigError(f"Unknown recipe {name!r} here: choose one of {', '.join(SCORE_ONLY)}.")
    return PrunedSoup(passes) if name == "pruned" else RECIPES[name]()


__all__ = [
    "RECIPES",
    "SCORE_ONLY",
    "GreedySoup",
    "LearnedOptions",
    "LearnedSoup",
    "MixingTrainer",
    "Objective",
    "PrunedSoup",
    "RecipeResult",
    "SoupRecipe",
    "Step",
    "UniformSoup",
    "WiseSoup",
    "get_recipe",
    "parse_alphas",
    "rank",
]
