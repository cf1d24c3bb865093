"""Soup recipes. Each one returns a `Mixture`; none of them touches tensors."""

from __future__ import annotations

from typing import get_args

from ..errors import ConfigError
from ..mixture import Recipe
from .base import Objective, RecipeResult, SoupRecipe, Step, rank
from .greedy import GreedySoup
from .pruned import PrunedSoup
from .uniform import UniformSoup

RECIPES: dict[str, type[SoupRecipe]] = {cls.name(): cls for cls in (UniformSoup, GreedySoup, PrunedSoup)}
assert set(RECIPES) == set(get_args(Recipe))


def get_recipe(name: str, passes: int = 1) -> SoupRecipe:
    """The recipe called `name`, e.g. `get_recipe("greedy")`."""
    if name not in RECIPES:
        raise ConfigError(f"Unknown recipe {name!r}: choose one of {', '.join(RECIPES)}.")
    return PrunedSoup(passes) if name == "pruned" else RECIPES[name]()


__all__ = [
    "RECIPES",
    "GreedySoup",
    "Objective",
    "PrunedSoup",
    "RecipeResult",
    "SoupRecipe",
    "Step",
    "UniformSoup",
    "get_recipe",
    "rank",
]
