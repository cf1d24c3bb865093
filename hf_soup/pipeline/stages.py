"""The stages every soup run goes through, each returning a typed value: check the candidates, then (without
data) let a data-free recipe choose the mixture.

Scored runs go on in `scored_stages.py` (score → cook the recipe → summarise), imported only when data is scored;
the writer (`output.py`) and the Hub push (`hub.py`) come after.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import JsonCache, cache_key, default_cache_dir
from ..candidates.compat import CompatibilityReport, check_compatibility
from ..candidates.diagnostics import Diagnostics, diagnose, tensor_cosines
from ..candidates.verify import ingredient_fingerprints
from ..checkpoints.sources import SoupSources
from ..checkpoints.weights import averaged
from ..config import SoupConfig
from ..errors import IncompatibleCandidatesError, NoCandidatesError
from ..merge.adapter import require_lora_candidates
from ..merge.materialize import soup_dtype
from ..mixture import Ingredient, Mixture
from ..recipes import RecipeContext, RecipeResult, SoupRecipe, build_recipe, recipe_class
from ..results import CandidateRow, RecipeInfo

logger = logging.getLogger(__name__)


@dataclass
class Checked:
    """The check stage: which candidates are compatible, their open weights, content fingerprints, how far each is
    from the base, and which are kept out of the soup (with the reason)."""

    compatibility: CompatibilityReport
    sources: SoupSources
    fingerprints: dict[str, str]
    diagnostics: Diagnostics
    excluded: dict[str, str]
    cache: JsonCache
    dtype: torch.dtype

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.compatibility.accepted]

    @property
    def pool(self) -> list[str]:
        """What recipes may put in the soup."""
        return [cid for cid in self.ids if cid not in self.excluded]

    @property
    def revisions(self) -> dict[str, str | None]:
        return {c.id: c.revision for c in self.compatibility.accepted}

    @property
    def base(self) -> Ingredient:
        base = self.compatibility.base
        return Ingredient(base.id, 0.0, base.revision)


def compatible_stage(
    config: SoupConfig, api, label_order: list[str] | None = None
) -> tuple[CompatibilityReport, SoupSources, JsonCache]:
    """Candidates → compatibility (configs and tensor headers only), with the open sources and the cache.

    `label_order`: a Trainer's label names, when it scores (candidates are aligned to them by name).
    """
    compatibility, sources = check_compatibility(
        config.base,
        config.candidates,
        allow_pickle=config.allow_pickle,
        api=api,
        trust_remote_code=config.trust_remote_code,
        label_order=label_order,
        hub_weights="stream" if config.stream else "download",
        vocab=config.vocab,
        soup=config.soup,
    )
    compatibility.raise_if_unusable(strict=config.strict, minimum=recipe_class(config.recipe).min_candidates)
    if config.output_kind == "lora":
        require_lora_candidates(compatibility.accepted)
    cache = JsonCache(Path(config.cache_dir) if config.cache_dir else default_cache_dir())
    return compatibility, sources, cache


def check_stage(
    config: SoupConfig, api, label_order: list[str] | None = None, quiet: bool = False
) -> Checked:
    """Candidates → compatibility → fingerprints (duplicates count once) → diagnostics → exclusions."""
    compatibility, sources, cache = compatible_stage(config, api, label_order)
    return verified_stage(config, compatibility, sources, cache, quiet)


def verified_stage(
    config: SoupConfig,
    compatibility: CompatibilityReport,
    sources: SoupSources,
    cache: JsonCache,
    quiet: bool,
) -> Checked:
    """Fingerprints (a first run reads every input for them), then `settled_stage`."""
    fingerprints = ingredient_fingerprints(compatibility, sources, cache, quiet=quiet)
    return settled_stage(config, (compatibility, sources, cache), fingerprints, quiet=quiet)


def settled_stage(
    config: SoupConfig, opened: tuple, fingerprints: dict[str, str], diagnostics=None, quiet: bool = False
) -> Checked:
    """From the fingerprints: duplicates count once, then diagnostics (cached by content, or `diagnostics` of
    every accepted candidate, measured by the single pass) decide which candidates are kept out.

    Args:
        opened (`tuple`): `compatible_stage`'s `(compatibility, sources, cache)`.
    """
    compatibility, sources, cache = opened
    for duplicate in compatibility.reject_duplicates(fingerprints):
        logger.warning("%s is identical to another candidate; it counts once.", duplicate)
    compatibility.raise_if_unusable(strict=config.strict, minimum=recipe_class(config.recipe).min_candidates)
    sources = sources.restricted([c.id for c in compatibility.accepted])
    if diagnostics is not None:
        diagnostics = diagnostics.restricted(list(sources.candidates))
    diagnostics = _diagnostics(sources, fingerprints, cache, quiet, diagnostics)
    excluded = excluded_candidates(config, diagnostics)
    dtype = soup_dtype(sources, config.dtype)
    return Checked(
        compatibility, sources, fingerprints, diagnostics, excluded=excluded, cache=cache, dtype=dtype
    )


def _diagnostics(
    sources: SoupSources, fingerprints, cache: JsonCache, quiet: bool, measured: Diagnostics | None = None
) -> Diagnostics:
    """Distances and angles to the base, cached by the content of the base and the candidates."""
    key = diagnostics_key(sources, fingerprints)
    if measured is None and (hit := cache.get(key)) is not None:
        return Diagnostics.from_dict(hit)
    diagnostics = measured or diagnose(sources, quiet=quiet)
    cache.put(key, diagnostics.to_dict())
    return diagnostics


def diagnostics_key(sources: SoupSources, fingerprints: dict[str, str]) -> str:
    """The diagnostics' cache key: the content of the base and of each candidate, in order."""
    ids = list(sources.candidates)
    return cache_key("diagnostics", fingerprints[sources.base_id], [fingerprints[i] for i in ids])


def excluded_candidates(config: SoupConfig, diagnostics: Diagnostics) -> dict[str, str]:
    """Candidates kept out of the soup because they do not look fine-tuned from the base, with the reason.

    `--strict` makes any of them fatal (before scoring); `--include-flagged` lets them in.
    """
    flagged = diagnostics.flagged
    if flagged and config.strict:
        reasons = "; ".join(f"{cid}: {reason}" for cid, reason in flagged.items())
        raise IncompatibleCandidatesError(
            f"--strict: {len(flagged)} candidate(s) do not look fine-tuned from {config.base} ({reasons}). "
            "Remove them, check --base, or drop --strict (they are then kept out of the soup)."
        )
    if config.include_flagged:
        return {}
    if flagged and len(flagged) == len(diagnostics.ids):
        raise NoCandidatesError(
            f"No candidate looks fine-tuned from {config.base} ({'; '.join(flagged.values())}). Check --base, "
            "or pass --include-flagged to soup them anyway."
        )
    excluded = {
        cid: f"kept out of the soup: {reason} (--include-flagged lets it in)"
        for cid, reason in flagged.items()
    }
    for cid, reason in excluded.items():
        logger.warning("%s %s", cid, reason)
    return excluded


def recipe_context(checked: Checked, quiet: bool) -> RecipeContext:
    """What recipes may use beyond scores: the base, the tensors it lacks and the task vectors' angles."""
    sources = checked.sources
    reference = sources.reference
    headless = [
        n for n in reference.keys() if n not in sources.alignment.base_names and averaged(reference.dtype(n))
    ]
    order = [cid for cid in checked.compatibility.given_order if cid in checked.pool]
    context = RecipeContext(checked.base, headless, quiet=quiet, candidate_order=order)
    context.task_vector_cosines = lambda ids: tensor_cosines(sources, ids, quiet=quiet)
    return context


def data_free_stage(config: SoupConfig, checked: Checked, quiet: bool) -> tuple[SoupRecipe, RecipeResult]:
    """Without data: the recipe chooses from the candidates alone (uniform: a plain merge; Model Stock)."""
    recipe = build_recipe(config, recipe_context(checked, quiet))
    return recipe, recipe.cook(checked.pool, {}, None, checked.revisions)


def recipe_info(recipe: type[SoupRecipe] | SoupRecipe) -> RecipeInfo:
    return RecipeInfo(recipe.name(), recipe.pretty_name(), recipe.reference_url())


def unscored_rows(checked: Checked, mixture: Mixture) -> list[CandidateRow]:
    kept = {i.id for i in mixture.ingredients if i.weight != 0}
    return [CandidateRow(cid, cid in kept, checked.excluded.get(cid)) for cid in checked.ids]
