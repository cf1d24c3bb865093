"""The Mixture: the small, JSON-serialisable value every recipe returns.

A mixture names its ingredients and their weights. It never holds tensors: one materializer turns it into
weights, and the manifest, the model card and the score cache all read the same value.

```json
{"recipe": "greedy", "base": {"id": "./minilm", "revision": null, "weight": 0.0},
 "ingredients": [{"id": "./runs/a", "revision": null, "weight": 0.5}, {"id": "./runs/b", "revision": null, "weight": 0.5}],
 "per_tensor_weights": null}
```
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Ingredient:
    """One weighted model in a mixture.

    Args:
        id (`str`): the candidate id, as the user named it (a local path or a Hub id).
        weight (`float`): its mixing weight.
        revision (`str`, *optional*): the commit SHA it was pinned to, for Hub candidates.
    """

    id: str
    weight: float
    revision: str | None = None


@dataclass(frozen=True)
class Mixture:
    """Which ingredients to average, and with which weights.

    Args:
        recipe (`str`): the recipe that produced it (`uniform`, `greedy`, ...; `hf_soup.recipes.RECIPES`).
        ingredients (`tuple[Ingredient, ...]`): the weighted ingredients; weights sum to 1 with the base's.
        base (`Ingredient`, *optional*): the shared initialisation, with weight 0 unless interpolated with.
        per_tensor_weights (`dict`, *optional*): per-tensor weight overrides, `{tensor_name: {id: weight}}`.
        method (`dict`, *optional*): a merge method that is not a weighted average, with its parameters:
            `{"name": "ties", "lambda": 1.0, "normalize": True, "density": {id: 0.5}}` (`merge/methods.py`);
            the ingredients' weights are then its per-model weights.

    Example:
    ```python
    >>> Mixture.uniform("uniform", ["./runs/a", "./runs/b"]).weights()
    {'./runs/a': 0.5, './runs/b': 0.5}
    ```
    """

    recipe: str
    ingredients: tuple[Ingredient, ...]
    base: Ingredient | None = None
    per_tensor_weights: dict[str, dict[str, float]] | None = field(default=None, compare=True)
    method: dict[str, Any] | None = None

    @classmethod
    def uniform(cls, recipe: str, ids: list[str], revisions: dict[str, str | None] | None = None) -> Mixture:
        """An equal-weight mixture of `ids` (in the given order)."""
        revisions = revisions or {}
        weight = 1.0 / len(ids)
        return cls(recipe, tuple(Ingredient(i, weight, revisions.get(i)) for i in ids))

    def ids(self) -> list[str]:
        return [ingredient.id for ingredient in self.ingredients]

    def weights(self) -> dict[str, float]:
        return {ingredient.id: ingredient.weight for ingredient in self.ingredients}

    def renamed(self, rename: Callable[[str], str]) -> Mixture:
        """This mixture with every ingredient id (and the base's) replaced by `rename(id)`, wherever ids appear:
        the ingredients, the per-tensor weights and a method's per-model parameters."""

        def by_new_id(values: dict[str, Any]) -> dict[str, Any]:
            return {rename(cid): value for cid, value in values.items()}

        return Mixture(
            self.recipe,
            tuple(replace(i, id=rename(i.id)) for i in self.ingredients),
            base=replace(self.base, id=rename(self.base.id)) if self.base else None,
            per_tensor_weights={name: by_new_id(w) for name, w in self.per_tensor_weights.items()}
            if self.per_tensor_weights
            else None,
            method={k: by_new_id(v) if isinstance(v, dict) else v for k, v in self.method.items()}
            if self.method is not None
            else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "base": asdict(self.base) if self.base else None,
            "ingredients": [asdict(ingredient) for ingredient in self.ingredients],
            "per_tensor_weights": self.per_tensor_weights,
            **({"method": self.method} if self.method is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mixture:
        base = Ingredient(**data["base"]) if data.get("base") else None
        return cls(
            recipe=data["recipe"],
            ingredients=tuple(Ingredient(**item) for item in data["ingredients"]),
            base=base,
            per_tensor_weights=data.get("per_tensor_weights"),
            method=data.get("method"),
        )

    def content_key(self, fingerprints: dict[str, str]) -> str:
        """A hash of what the mixture computes: its weights and the content of each ingredient.

        The recipe name, the order of ingredients and their ids do not matter (only their content does), so a
        greedy trial and a uniform soup of the same models share one cache entry. `fingerprints` holds the base's
        under its id too.
        """

        def content(cid: str) -> str:
            return fingerprints[cid]

        parts = sorted((content(i.id), round(i.weight, 12)) for i in self.ingredients if i.weight != 0)
        payload: dict[str, Any] = {"ingredients": parts}
        if self.per_tensor_weights:
            payload["per_tensor_weights"] = {
                name: sorted((content(cid), round(w, 12)) for cid, w in weights.items() if w != 0)
                for name, weights in self.per_tensor_weights.items()
            }
        if self.method is not None:  # per-model parameters by content, as the weights are
            payload["method"] = {
                key: {content(cid): v for cid, v in value.items()} if isinstance(value, dict) else value
                for key, value in self.method.items()
            }
            payload["order"] = [content(i.id) for i in self.ingredients]  # SLERP's direction, DARE's seeds
        if self.base is not None and self.base.weight != 0:
            payload["base"] = (fingerprints[self.base.id], round(self.base.weight, 12))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
