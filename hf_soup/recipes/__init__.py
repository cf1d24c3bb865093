"""Soup recipes, one file each. Each returns a `Mixture`; none touches tensors.

The registry below is the only place a recipe is listed: `SoupConfig` takes `--recipe` choices from it, the pipeline
builds recipes through `build_recipe`, and the card and table ask the recipe class about its own results.
"""

from __future__ import annotations

from ..errors import ConfigError
from .auto import AutoSoup
from .base import CurvePoint, Fold, Objective, RecipeContext, RecipeResult, SoupRecipe, Step, rank
from .greedy import GreedySoup
from .learned import LearnedOptions, LearnedSoup
from .pruned import PrunedSoup
from .stock import StockSoup
from .uniform import UniformSoup
from .wise import WiseSoup, parse_alphas

RECIPES: dict[str, type[SoupRecipe]] = {
    cls.name(): cls
    for cls in (
        UniformSoup,
        GreedySoup,
        PrunedSoup,
        LearnedSoup,
        WiseSoup,
        StockSoup,
        AutoSoup,
    )
}


def recipe_class(name: str) -> type[SoupRecipe]:
    """The recipe called `name`.

    Raises:
        ConfigError: no recipe has that name.
    """
    if name not in RECIPES:
        raise ConfigError(f"Unknown recipe {name!r}: choose one of {', '.join(RECIPES)}.")
    return RECIPES[name]


def build_recipe(config, context: RecipeContext) -> SoupRecipe:
    """The recipe of `config` (its `recipe` and that recipe's options), built with what the pipeline offers."""
    context.build = lambda name: recipe_class(name).from_config(config, context)
    return recipe_class(config.recipe).from_config(config, context)


__all__ = [
    "RECIPES",
    "CurvePoint",
    "Fold",
    "GreedySoup",
    "LearnedOptions",
    "LearnedSoup",
    "Objective",
    "PrunedSoup",
    "RecipeContext",
    "RecipeResult",
    "SoupRecipe",
    "Step",
    "UniformSoup",
    "WiseSoup",
    "build_recipe",
    "parse_alphas",
    "rank",
    "recipe_class",
]
