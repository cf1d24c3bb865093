"""Greedy soup: the paper's Recipe 1 (Wortsman et al. 2022, arXiv 2203.05482).

Sort candidates by their own selection score, seed the soup with the best one, then add each next candidate
only if the soup's selection score does not drop (`>=`). The result can never score below the best single
candidate on the selection split.
"""

from __future__ import annotations

from ..mixture import Mixture
from .base import RecipeResult, SoupRecipe, Step, rank


class GreedySoup(SoupRecipe):
    @classmethod
    def name(cls) -> str:
        return "greedy"

    @classmethod
    def pretty_name(cls) -> str:
        return "Greedy soup"

    def cook(self, candidates, individual_scores, objective, revisions=None, tie_break=None) -> RecipeResult:
        ordered = rank(candidates, individual_scores, tie_break)
        soup = [ordered[0]]
        best = individual_scores[ordered[0]]
        trajectory = [Step(0, "seed", ordered[0], best, True, 1)]
        for step, candidate in enumerate(ordered[1:], start=1):
            trial = Mixture.uniform(self.name(), [*soup, candidate], revisions)
            score = objective(trial, best)
            accepted = score is not None and score >= best
            if accepted:
                soup.append(candidate)
                best = score
            trajectory.append(
                Step(step, "add", candidate, score, accepted, len(soup), stopped_early=score is None)
            )
        return RecipeResult(Mixture.uniform(self.name(), soup, revisions), trajectory)
