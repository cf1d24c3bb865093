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
from dataclasses import asdict, dataclass, field
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "base": asdict(self.base) if self.base else None,
            "ingredients": [asdict(ingredient) for ingredient in self.ingredients],
            "per_tensor_weights": self.per_tensor_weights,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mixture:
        base = Ingredient(**data["base"]) if data.get("base") else None
        return cls(
            recipe=data["recipe"],
            ingredients=tuple(Ingredient(**item) for item in data["ingredients"]),
            base=base,
            per_tensor_weights=data.get("per_tensor_weights"),
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
        if self.base is not None and self.base.weight != 0:
            payload["base"] = (fingerprints[self.base.id], round(self.base.weight, 12))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
