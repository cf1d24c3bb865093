"""What the task-vector recipes share (task arithmetic, TIES, DARE): their options, read as mergekit names them, and
the one mixture they all return.

Each recipe is a data-free merge: it takes every candidate, gives each its per-model weight (and density), and
names its method in `Mixture.method`; the tensors are made by `merge/methods.py`. With data it is scored and compared
with the best individual like any soup. Per-model values are given once: one number for every model (`--density
0.5`), one per model in the order `--candidates` named them (`--weights 0.6,0.4`), or by id (`--weights a=0.6,b=0.4`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from ..mixture import Ingredient, Mixture
from .base import RecipeContext, RecipeResult, SoupRecipe, option

PerModel = str | float | Sequence[float] | dict[str, float] | None


def _values(value: PerModel, flag: str) -> list[str | float] | dict[str, float] | None:
    """`value` split into numbers (or `id=number` pairs), without knowing the candidates yet."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, (int, float)):
        items: list = [value]
    else:
        items = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    try:
        if items and all(isinstance(p, str) and "=" in p for p in items):
            return {cid.strip(): float(number) for cid, number in (p.rsplit("=", 1) for p in items)}
        return [float(p) for p in items]
    except ValueError:
        raise ConfigError(
            f"{flag} {value!r} is not a number, a comma-separated list of numbers (one per candidate, in the order "
            "--candidates names them) or id=number pairs."
        ) from None


def per_model(value: PerModel, order: Sequence[str], flag: str, default: float) -> dict[str, float]:
    """Each candidate's value of a per-model option (`--weights`, `--density`)."""
    parsed = _values(value, flag)
    if parsed is None:
        return {cid: default for cid in order}
    if isinstance(parsed, dict):
        unknown = sorted(set(parsed) - set(order))
        if unknown:
            raise ConfigError(
                f"{flag} names {', '.join(unknown)}, which is not in the soup; its candidates are {', '.join(order)}."
            )
        return {cid: parsed.get(cid, default) for cid in order}
    if len(parsed) == 1:
        return {cid: float(parsed[0]) for cid in order}
    if len(parsed) != len(order):
        raise ConfigError(
            f"{flag} gives {len(parsed)} values but the soup has {len(order)} candidates ({', '.join(order)}): "
            "give one value, one per candidate in that order, or id=value pairs."
        )
    return {cid: float(v) for cid, v in zip(order, parsed, strict=True)}


def _check_densities(value: PerModel) -> None:
    parsed = _values(value, "--density")
    numbers = parsed.values() if isinstance(parsed, dict) else parsed or []
    bad = [d for d in numbers if not 0 < float(d) <= 1]
    if bad:
        raise ConfigError(
            f"--density must be in (0, 1], got {bad[0]}: the fraction of each task vector kept."
        )


@dataclass(frozen=True)
class TaskArithmeticOptions:
    weights: str | None = option(
        None,
        "Task-vector recipes: each model's weight w_i (mergekit's `weight`): one number for all, one per model "
        "in the order --candidates names them, or id=w pairs (default: 1 for every model).",
        metavar="W[,W...]",
    )
    lambda_: float = option(
        1.0, "Task-vector recipes: λ, the scale of the merged task vector (mergekit's `lambda`).", metavar="λ"
    )
    normalize: bool | None = option(
        None,
        "Task-vector recipes: divide the merged task vector by the sum of the weights (that agree in sign, for "
        "TIES); the default is mergekit's: on for ties, off for task_arithmetic, dare_linear and dare_ties.",
    )

    def __post_init__(self):
        _values(self.weights, "--weights")


@dataclass(frozen=True)
class SparseOptions(TaskArithmeticOptions):
    density: str | None = option(
        None,
        "TIES / DARE: the fraction of each task vector kept (mergekit's `density`), per model like --weights "
        "(default: 1, mergekit's: nothing dropped; the TIES paper keeps 0.2).",
        metavar="D[,D...]",
    )

    def __post_init__(self):
        super().__post_init__()
        _check_densities(self.density)


class TaskVectorRecipe(SoupRecipe):
    """A recipe that merges task vectors θ_i − θ_base by `method` (one of `merge.methods.TASK_VECTOR_METHODS`)."""

    needs_data = False
    method: ClassVar[str]
    default_normalize: ClassVar[bool] = False
    uses_density: ClassVar[bool] = False
    formula: ClassVar[str]
    Options = TaskArithmeticOptions

    def __init__(self, options, context: RecipeContext, seed: int = 0):
        self.options, self.context, self.seed = options, context, seed

    @classmethod
    def name(cls) -> str:
        return cls.method

    @classmethod
    def from_config(cls, config, context: RecipeContext) -> TaskVectorRecipe:
        return cls(config.options(cls), context, config.seed)

    @classmethod
    def label(cls, soup_name: str, details: dict[str, Any] | None) -> str:
        return f"{soup_name} (λ={details['lambda']:g})" if details and details["lambda"] != 1 else soup_name

    def parameters(self, order: list[str]) -> dict[str, Any]:
        """The method's parameters, as `Mixture.method` records them."""
        options = self.options
        normalize = self.default_normalize if options.normalize is None else options.normalize
        method: dict[str, Any] = {"name": self.method, "lambda": options.lambda_, "normalize": normalize}
        if self.uses_density:
            method["density"] = per_model(options.density, order, "--density", 1.0)
        if self.method.startswith("dare"):
            method["seed"] = self.seed
        return method

    def cook(self, candidates, individual_scores, objective, revisions=None, tie_break=None) -> RecipeResult:
        revisions = revisions or {}
        order = [cid for cid in self.context.candidate_order if cid in candidates] or sorted(candidates)
        weights = per_model(self.options.weights, order, "--weights", 1.0)
        if not any(weights.values()):
            raise ConfigError("--weights gives every model weight 0: nothing would be merged.")
        ingredients = tuple(Ingredient(cid, weights[cid], revisions.get(cid)) for cid in order)
        total = sum(weights.values())
        head = {name: {cid: w / total for cid, w in weights.items()} for name in self.context.headless}
        method = self.parameters(order)
        mixture = Mixture(self.name(), ingredients, self.context.base, head or None, method)
        details = {**{k: v for k, v in method.items() if k != "name"}, "weights": weights}
        return RecipeResult(mixture, [], details)


CARD_SECTION = """### {{ details_title }}

{{ formula }}
Per model: {% for cid, w in details.weights.items() %}`{{ name(cid) }}` w = {{ '%g' % w }}{% if details.density %}, density = {{ '%g' % details.density[cid] }}{% endif %}{% if not loop.last %}; {% endif %}{% endfor %}.
λ = {{ '%g' % details['lambda'] }}, normalize = {{ 'on' if details.normalize else 'off' }}{% if details.seed is defined %}, masks seeded by `--seed {{ details.seed }}`{% endif %}.
Tensors the base lacks (the task head) and BatchNorm's running statistics are the weights' normalised average.
"""


def card_section(title: str, formula: str) -> str:
    return CARD_SECTION.replace("{{ details_title }}", title).replace("{{ formula }}", formula)
