"""The interface every recipe implements: candidates and an objective in, a Mixture out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..mixture import Mixture

# Scores a mixture on the selection split; higher is better (scorers negate losses). The second argument is the
# score the trial must reach to be accepted: a scorer may stop early and return None once it provably cannot.
Objective = Callable[[Mixture, "float | None"], "float | None"]


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


@dataclass
class RecipeResult:
    """What a recipe returns: the mixture it chose, and the trials it made on the way."""

    mixture: Mixture
    trajectory: list[Step] = field(default_factory=list)


class SoupRecipe(ABC):
    """A soup recipe. It only picks ingredients and weights; it never touches tensors."""

    @classmethod
    @abstractmethod
    def name(cls) -> str: ...

    @classmethod
    @abstractmethod
    def pretty_name(cls) -> str: ...

    @classmethod
    def reference_url(cls) -> str:
        return "https://arxiv.org/abs/2203.05482"

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
    return sorted(candidates, key=lambda cid: (-individual_scores[cid], tie_break.get(cid, 0.0), cid))
