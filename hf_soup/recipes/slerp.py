"""SLERP: spherical interpolation between two fine-tunes, tensor by tensor (Shoemake 1985; mergekit's `slerp`).

Each row of a tensor (its leading axis: one output unit of a weight matrix, one entry of a bias) is one vector, as
in mergekit 0.1.5: θ = sin((1 − t)Ω)/sin Ω · θ_a + sin(tΩ)/sin Ω · θ_b, with Ω the angle between the rows of θ_a and
θ_b, and the linear interpolation (1 − t)·θ_a + t·θ_b where they are nearly parallel (|cos Ω| > 0.9995; so a bias,
whose rows are single numbers, is interpolated linearly).
θ_a is the first of the two candidates in the order `--candidates` names them (t = 0), θ_b the second (t = 1).
With one candidate, θ_a is the base (mergekit's form, where `base_model` is the t = 0 end; a mergekit config maps
to it), and tensors the base lacks (a task head) are the candidate's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..mixture import Ingredient, Mixture
from .base import RecipeContext, RecipeResult, SoupRecipe, option

CARD_SECTION = """### SLERP

Each row of each tensor is interpolated on the sphere from `{{ details['from'] }}` (t = 0) to `{{ details['to'] }}`
(t = 1) at **t = {{ '%g' % details.t }}**: θ = sin((1 − t)Ω)/sin Ω · θ_a + sin(tΩ)/sin Ω · θ_b, with Ω the angle
between the two rows, and linearly where they are nearly parallel (|cos Ω| > 0.9995), as mergekit's `slerp` does.
"""


@dataclass(frozen=True)
class SlerpOptions:
    t: float = option(
        0.5, "SLERP: the interpolation factor, 0 = the first candidate, 1 = the second (mergekit's `t`)."
    )

    def __post_init__(self):
        if not 0 <= self.t <= 1:
            raise ConfigError(f"--t must be in [0, 1], got {self.t}: 0 is the first candidate, 1 the second.")


class SlerpSoup(SoupRecipe):
    needs_data = False
    min_candidates = 1
    Options = SlerpOptions
    card_section = CARD_SECTION

    def __init__(self, options: SlerpOptions, context: RecipeContext):
        self.options, self.context = options, context

    @classmethod
    def name(cls) -> str:
        return "slerp"

    @classmethod
    def pretty_name(cls) -> str:
        return "SLERP"

    @classmethod
    def reference_url(cls) -> str:
        return "https://dl.acm.org/doi/10.1145/325165.325242"

    @classmethod
    def reference_title(cls) -> str:
        return "Shoemake 1985, *Animating rotation with quaternion curves* (SLERP)"

    @classmethod
    def from_config(cls, config, context: RecipeContext) -> SlerpSoup:
        return cls(config.options(cls), context)

    @classmethod
    def label(cls, soup_name: str, details: dict[str, Any] | None) -> str:
        return f"{soup_name} (t={details['t']:g})" if details else soup_name

    def cook(self, candidates, individual_scores, objective, revisions=None, tie_break=None) -> RecipeResult:
        order = [cid for cid in self.context.candidate_order if cid in candidates] or sorted(candidates)
        if len(order) > 2:
            raise ConfigError(
                f"--recipe slerp interpolates 2 models; the soup has {len(order)} candidates ({', '.join(order)}). "
                "Pass two to --candidates, or one to interpolate from the base to it."
            )
        revisions, t, base = revisions or {}, self.options.t, self.context.base
        method = {"name": "slerp", "t": t}
        if len(order) == 1:  # mergekit's form: from the base (t = 0) to the one candidate
            ingredients = (Ingredient(order[0], t, revisions.get(order[0])),)
            mixture = Mixture(
                self.name(), ingredients, Ingredient(base.id, 1.0 - t, base.revision), None, method
            )
            return RecipeResult(mixture, [], {"t": t, "from": base.id, "to": order[0]})
        ingredients = tuple(
            Ingredient(cid, w, revisions.get(cid)) for cid, w in zip(order, (1.0 - t, t), strict=True)
        )
        mixture = Mixture(self.name(), ingredients, base, None, method)
        return RecipeResult(mixture, [], {"t": t, "from": order[0], "to": order[1]})
