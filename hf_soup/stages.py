"""The stages of a soup run, each returning a typed value: check → score → cook the recipe → summarise.

`api.cook` calls them in order; the writer (`output.py`) and the Hub push (`hub.py`) come after.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapter import require_lora_candidates
from .cache import JsonCache, cache_key, default_cache_dir
from .compat import CompatibilityReport, check_compatibility
from .config import SoupConfig
from .diagnostics import Diagnostics, diagnose, tensor_cosines
from .errors import IncompatibleCandidatesError, NoCandidatesError
from .integrations import INGREDIENT_FILE
from .materialize import soup_dtype
from .mixing import MixingTrainer
from .mixture import Ingredient, Mixture
from .preparation import prepare_scorer, prepare_trainer_scorer, task_spec_of
from .recipes import Fold, RecipeContext, RecipeResult, SoupRecipe, build_recipe, rank
from .results import CandidateRow, Entry, RecipeInfo, SplitsInfo, TaskInfo
from .scoring import Scorer
from .sources import SoupSources
from .summary import Summary, ties
from .trainer_scoring import trainer_label_names
from .verify import ingredient_fingerprints
from .weights import averaged

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


def check_stage(config: SoupConfig, api, trainer=None, quiet: bool = False) -> Checked:
    """Candidates → compatibility → fingerprints (duplicates count once) → diagnostics → exclusions."""
    compatibility, sources = check_compatibility(
        config.base,
        config.candidates,
        allow_pickle=config.allow_pickle,
        api=api,
        trust_remote_code=config.trust_remote_code,
        # The trainer's data and model have a label order of their own: candidates are aligned to it by name.
        label_order=trainer_label_names(trainer) if trainer is not None else None,
    )
    compatibility.raise_if_unusable(strict=config.strict)
    if config.output_kind == "lora":
        require_lora_candidates(compatibility.accepted)
    cache = JsonCache(Path(config.cache_dir) if config.cache_dir else default_cache_dir())
    fingerprints = ingredient_fingerprints(compatibility, sources, cache, quiet=quiet)
    for duplicate in compatibility.reject_duplicates(fingerprints):
        logger.warning("%s is identical to another candidate; it counts once.", duplicate)
    compatibility.raise_if_unusable(strict=config.strict)
    sources = sources.restricted([c.id for c in compatibility.accepted])
    diagnostics = _diagnostics(sources, fingerprints, cache, quiet)
    excluded = excluded_candidates(config, diagnostics)
    dtype = soup_dtype(sources, config.dtype)
    return Checked(
        compatibility, sources, fingerprints, diagnostics, excluded=excluded, cache=cache, dtype=dtype
    )


def _diagnostics(sources: SoupSources, fingerprints, cache: JsonCache, quiet: bool) -> Diagnostics:
    """Distances and angles to the base, cached by the content of the base and the candidates."""
    ids = list(sources.candidates)
    key = cache_key("diagnostics", fingerprints[sources.base_id], [fingerprints[i] for i in ids])
    if (hit := cache.get(key)) is not None:
        return Diagnostics.from_dict(hit)
    diagnostics = diagnose(sources, quiet=quiet)
    cache.put(key, diagnostics.to_dict())
    return diagnostics


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


def scoring_stage(config: SoupConfig, checked: Checked, preprocessor, scoring, quiet: bool):
    """`(Scorer, split plan)`: hf-soup's data pipeline, or the user's Trainer (`scoring = (trainer, report)`)."""
    trainer, report_dataset = scoring
    if trainer is not None:
        cache = None if config.no_cache else checked.cache
        return prepare_trainer_scorer(trainer, report_dataset, checked, cache)
    return prepare_scorer(config, task_spec_of(config), checked, preprocessor, quiet)


@dataclass
class Cooked:
    """The recipe stage: the recipe, what it returned, and every candidate's own selection scores."""

    recipe: SoupRecipe
    result: RecipeResult
    singles: dict[str, Mixture]  # each candidate as a one-ingredient mixture
    ranked: list[str]  # by the selection metric; ties by selection loss, then id
    losses: dict[str, float]  # selection losses


def recipe_stage(config: SoupConfig, checked: Checked, scorer: Scorer, quiet: bool) -> Cooked:
    """Score every candidate on the selection split, then let the recipe choose the mixture."""
    singles = {cid: Mixture.uniform("single", [cid], checked.revisions) for cid in checked.ids}
    individual = {cid: scorer.selection_value(m) for cid, m in singles.items()}
    # Selection losses break ties on coarse metrics such as accuracy.
    losses = {cid: scorer.score(m, "selection").loss for cid, m in singles.items()}
    recipe = build_recipe(config, recipe_context(checked, scorer, quiet, config.seed))
    result = recipe.cook(
        checked.pool, individual, scorer.selection_value, checked.revisions, tie_break=losses
    )
    return Cooked(recipe, result, singles, rank(checked.ids, individual, losses), losses)


def recipe_context(checked: Checked, scorer: Scorer | None, quiet: bool, seed: int = 0) -> RecipeContext:
    """What recipes may use beyond scores: the base, the tensors it lacks, the task vectors' angles, and (with
    hf-soup's own encoding of the data) the live model's trainer."""
    sources = checked.sources
    reference = sources.reference
    headless = [n for n in reference.keys()
                if n not in sources.alignment.base_names and averaged(reference.dtype(n))]  # fmt: skip
    context = RecipeContext(checked.base, headless, quiet=quiet)
    context.task_vector_cosines = lambda ids: tensor_cosines(sources, ids, quiet=quiet)
    split = scorer.splits["selection"] if scorer is not None else None
    if split is not None and split.features:

        def mixing_trainer(options) -> MixingTrainer:
            return MixingTrainer(
                scorer.workbench, split, scorer.collator, scorer.spec.regression, options, quiet
            )

        context.mixing_trainer = mixing_trainer
        # Built only if a recipe asks (auto): other recipes never pay for the halves' scores.
        context.folds = lambda: confirmation_folds(scorer, checked, seed)
    return context


def confirmation_folds(scorer: Scorer, checked: Checked, seed: int) -> list[Fold]:
    """The selection split in two seeded, disjoint halves, each with the candidates' scores on it and an
    objective on it (computed from the full selection logits, so a fold costs no forward pass of its own)."""
    order = np.random.default_rng(seed).permutation(len(scorer.splits["selection"]))
    halves = (np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :]))
    folds = []
    for name, indices in zip(("A", "B"), halves):
        individual = {cid: scorer.subset_value(Mixture.uniform("single", [cid], checked.revisions), indices)
                      for cid in checked.pool}  # fmt: skip
        folds.append(
            Fold(name, individual, lambda mixture, _bar, rows=indices: scorer.subset_value(mixture, rows))
        )
    return folds


def data_free_stage(config: SoupConfig, checked: Checked, quiet: bool) -> tuple[SoupRecipe, RecipeResult]:
    """Without data: the recipe chooses from the candidates alone (uniform: a plain merge; Model Stock)."""
    recipe = build_recipe(config, recipe_context(checked, None, quiet))
    return recipe, recipe.cook(checked.pool, {}, None, checked.revisions)


def recalibrated_statistics(scorer: Scorer, mixture: Mixture) -> dict[str, torch.Tensor]:
    """The soup's BatchNorm statistics re-estimated on the selection split, to be written instead of averages."""
    workbench = scorer.workbench
    workbench.load(mixture)  # `after_load` recalibrates
    state = workbench.model.state_dict()
    return {name: state[name].detach().cpu().clone()
            for name in workbench.after_load.buffer_names(workbench.model)}  # fmt: skip


def recipe_info(recipe: type[SoupRecipe] | SoupRecipe) -> RecipeInfo:
    return RecipeInfo(recipe.name(), recipe.pretty_name(), recipe.reference_url())


def unscored_rows(checked: Checked, mixture: Mixture) -> list[CandidateRow]:
    kept = {i.id for i in mixture.ingredients if i.weight != 0}
    return [CandidateRow(cid, cid in kept, checked.excluded.get(cid)) for cid in checked.ids]


def scored_fields(
    config: SoupConfig, checked: Checked, scorer: Scorer, plan, cooked: Cooked
) -> dict[str, Any]:
    """The scored fields of the `SoupSummary`: every candidate, the best individual (the paper's: the best
    primary metric on the selection split; ties by selection loss, then id), the soup, the baselines, the paired
    comparisons against that best individual, and the recipe's own record."""
    summary = Summary(scorer, cooked.singles)
    mixture, ranked = cooked.result.mixture, cooked.ranked
    selection = {cid: scorer.score(cooked.singles[cid], "selection") for cid in ranked}
    best_id = rank(ranked, {cid: scorer.primary_value(s) for cid, s in selection.items()}, cooked.losses)[0]
    uniform = Mixture.uniform(
        "uniform", [cid for cid in ranked if cid not in checked.excluded], checked.revisions
    )
    fields = _entries(summary, cooked, checked, best_id)
    others = {"soup": mixture, "uniform": uniform, "ensemble": ranked}
    fields.update(
        uniform=summary.entry("uniform soup", uniform),
        soup=summary.entry(f"{cooked.recipe.name()} soup", mixture),
        ensembles=_ensembles(summary, ranked, mixture),
        task=_task_info(scorer),
        splits=_splits_info(scorer, plan, summary.report_names),
        trajectory=[vars(step) for step in cooked.result.trajectory],
        comparisons=summary.comparisons(cooked.singles[best_id], others, config.bootstrap, config.seed),
        ties=_ties(scorer, ranked, selection, cooked.losses, best_id),
        warnings=[*getattr(plan, "warnings", []), *summary.warnings(ranked)],
        details=_details(cooked.result, summary),
    )
    return fields


def _entries(summary: Summary, cooked: Cooked, checked: Checked, best_id: str) -> dict[str, Any]:
    """Every candidate's row, the best individual, the best by the selection metric (when it is another
    candidate: shown, never compared against) and the oracle (best on the report split: never a claim)."""
    singles, ranked = cooked.singles, cooked.ranked
    kept = {i.id for i in cooked.result.mixture.ingredients if i.weight != 0}
    training = {c.id: _training_record(c.local_dir) for c in checked.compatibility.accepted}
    rows = [CandidateRow(cid, cid in kept, checked.excluded.get(cid), replace(summary.entry(cid, singles[cid]),
            id=cid), training[cid]) for cid in ranked]  # fmt: skip
    fields: dict[str, Any] = {
        "candidates": rows,
        "best_individual": replace(summary.entry(best_id, singles[best_id]), id=best_id),
        "oracle": _oracle(summary, singles, ranked),
    }
    if ranked[0] != best_id and summary.scorer.selection_metric != summary.scorer.spec.primary_metric:
        fields["best_by_selection_metric"] = replace(
            summary.entry(ranked[0], singles[ranked[0]]), id=ranked[0]
        )
    return fields


def _ensembles(summary: Summary, ranked: list[str], mixture: Mixture) -> list[Entry]:
    kept = {i.id for i in mixture.ingredients if i.weight != 0}
    soup_ids = [cid for cid in ranked if cid in kept]
    ensembles = [summary.ensemble(f"ensemble of all {len(ranked)} candidates", ranked)]
    if soup_ids != ranked and len(soup_ids) > 1:
        ensembles.append(summary.ensemble(f"ensemble of the {len(soup_ids)} soup ingredients", soup_ids))
    return ensembles


def _splits_info(scorer: Scorer, plan, report_names: list[str]) -> SplitsInfo:
    return SplitsInfo(
        selection={"name": plan.selection_name, "size": len(scorer.splits["selection"])},
        report={name: {"size": len(scorer.splits[name])} for name in report_names},
        same_split=plan.same_split,
        notes=plan.notes,
    )


def _task_info(scorer: Scorer) -> TaskInfo:
    spec = scorer.spec
    return TaskInfo(
        name=spec.name,
        metrics=list(spec.metrics),
        primary_metric=spec.primary_metric,
        selection_metric=scorer.selection_metric,
        positive_label=getattr(spec, "positive_label", None),
        dataset=spec.dataset or "",
        dataset_config=spec.dataset_config,
    )


def _ties(scorer: Scorer, ranked, selection, losses, best_id: str) -> list[dict]:
    """Ties on the selection metric, and the tie (if any) that decided the best individual's primary metric."""
    found = ties(
        ranked, {cid: scorer.value(s) for cid, s in selection.items()}, losses, scorer.selection_metric
    )
    primary = scorer.spec.primary_metric
    if scorer.selection_metric != primary:
        by_primary = {cid: scorer.primary_value(s) for cid, s in selection.items()}
        found += [t for t in ties(rank(ranked, by_primary, losses), by_primary, losses, primary)
                  if best_id in t["candidates"]]  # fmt: skip
    return found


def _details(result: RecipeResult, summary: Summary) -> dict[str, Any] | None:
    """The recipe's own record, with its curve (if any) scored on the report splits too."""
    if result.details is None:
        return None
    details = dict(result.details)
    if result.curve:
        details["curve"] = [
            {**point.fields, "selection_value": point.selection_value,
             **summary.entry(point.label, point.mixture).to_dict()}
            for point in result.curve
        ]  # fmt: skip
    return details


def _oracle(summary: Summary, singles: dict[str, Mixture], ids: list[str]) -> Entry | None:
    """The candidate that is best on the first report split: chosen by looking at the answers, so a labelled row
    for context, never a claim."""
    if not summary.report_names:
        return None
    split = summary.report_names[0]
    scores = {cid: summary.scorer.score(singles[cid], split) for cid in ids}
    values = {cid: summary.scorer.primary_value(score) for cid, score in scores.items()}
    oracle = rank(ids, values, {cid: score.loss for cid, score in scores.items()})[0]
    return replace(summary.entry(oracle, singles[oracle]), id=oracle, split=split)


def _training_record(folder: Path) -> dict | None:
    """What `SoupCallback` recorded about how a candidate was trained (hyperparameters, metrics), if anything."""
    try:
        return json.loads((Path(folder) / INGREDIENT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
