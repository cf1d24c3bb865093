"""Soup recipes, one file each. Each returns a `Mixture`; none touches tensors.

The registry below is the only place a recipe is listed: `SoupConfig` takes `--recipe` choices and the recipes'
options from it, the CLI makes their flags from it, the pipeline builds recipes through `build_recipe`, and the card
and table ask the recipe class about its own results.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .auto import AutoSoup
from .base import CurvePoint, Fold, Objective, RecipeContext, RecipeResult, SoupRecipe, Step, rank
from .dare_linear import DareLinearSoup
from .dare_ties import DareTiesSoup
from .greedy import GreedySoup
from .learned import LearnedOptions, LearnedSoup
from .pruned import PrunedSoup
from .slerp import SlerpSoup
from .stock import StockSoup
from .task_arithmetic import TaskArithmeticSoup
from .ties import TiesSoup
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
        TaskArithmeticSoup,
        TiesSoup,
        DareLinearSoup,
        DareTiesSoup,
        SlerpSoup,
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


def used_recipes(name: str) -> list[str]:
    """`name` and every recipe it builds, directly or through another (their options apply to the run)."""
    found = [name]
    for current in found:
        found += [built for built in recipe_class(current).builds if built not in found]
    return found


def option_owners() -> dict[str, list[str]]:
    """Each recipe option's name, and the recipes that declare it."""
    owners: dict[str, list[str]] = {}
    for name, cls in RECIPES.items():
        for item in dataclasses.fields(cls.Options):
            owners.setdefault(item.name, []).append(name)
    return owners


def recipe_options(recipe: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The `Options` of `recipe` and of each recipe it builds, from the option values `given` (defaults for the rest).

    Raises:
        ConfigError: an option no recipe declares, one that none of this run's recipes uses, or a bad value.
    """
    owners, used = option_owners(), used_recipes(recipe)
    for key in given:
        flag = "--" + key.rstrip("_").replace("_", "-")
        if key not in owners:
            raise ConfigError(
                f"Unknown recipe option {key!r}: the recipes' options are {', '.join(sorted(owners))}."
            )
        if not set(owners[key]) & set(used):
            raise ConfigError(
                f"{flag} is an option of --recipe {' / '.join(owners[key])}, not of --recipe {recipe}."
            )
    options = {}
    for name in used:
        cls = recipe_class(name).Options
        declared = {item.name for item in dataclasses.fields(cls)}
        options[name] = cls(**{key: value for key, value in given.items() if key in declared})
    return options


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
    "option_owners",
    "parse_alphas",
    "rank",
    "recipe_class",
    "recipe_options",
    "used_recipes",
]
