"""Uniform soup: the plain average of every candidate (Wortsman et al. 2022, Table 2 "uniform soup")."""

from __future__ import annotations

from ..mixture import Mixture
from .base import RecipeResult, SoupRecipe, rank


class UniformSoup(SoupRecipe):
    needs_data = False  # a plain merge

    @classmethod
    def name(cls) -> str:
        return "uniform"

    @classmethod
    def pretty_name(cls) -> str:
        return "Uniform soup"

    def cook(self, candidates, individual_scores, objective, revisions=None, tie_break=None) -> RecipeResult:
        ordered = rank(candidates, individual_scores, tie_break)
        mixture = Mixture.uniform(self.name(), ordered, revisions)
        return RecipeResult(mixture, [])
