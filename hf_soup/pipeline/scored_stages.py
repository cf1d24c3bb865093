"""The stages of a scored run, after the check: score every candidate → cook the recipe → summarise.

Imported by `api.cook` only when data is scored: these stages bring in evaluation (`evaluate`, `datasets`, the
models' classes), which costs seconds of imports that a plain merge never needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import SoupConfig
from ..mixture import Mixture
from ..recipes import Fold, RecipeContext, RecipeResult, SoupRecipe, build_recipe, rank, recipe_class
from ..results import INGREDIENT_FILE, CandidateRow, Entry, SplitsInfo, TaskInfo
from ..scoring.backbone import head_tensors
from ..scoring.mixing import MixingTrainer
from ..scoring.preparation import prepare_scorer, prepare_trainer_scorer, task_spec_of
from ..scoring.scorer import MixtureScorer
from ..scoring.trainer import trainer_label_names
from .stages import Checked, recipe_context, recipe_info
from .summary import Summary, ties

logger = logging.getLogger(__name__)


def label_order(trainer) -> list[str] | None:
    """The label names of a Trainer that scores: its data and model have a label order of their own, and
    candidates are aligned to it by name."""
    return trainer_label_names(trainer) if trainer is not None else None


@dataclass
class ScoredRun:
    """What the scored stages give `cook`: the summary's scored fields, the recipe's result, the scorer, and the
    BatchNorm statistics to write instead of averages (with `--recalibrate-bn`)."""

    fields: dict[str, Any]
    recipe_result: RecipeResult
    scorer: MixtureScorer
    overrides: dict[str, torch.Tensor]


def scored_run(
    config: SoupConfig, checked: Checked, preprocessor, scoring, quiet: bool, lap: Callable[[str], None]
) -> ScoredRun:
    """Score (`scoring = (trainer, report_dataset)`, or hf-soup's data pipeline), cook, and summarise."""
    trainer = scoring[0]
    scorer, plan = scoring_stage(config, checked, preprocessor, scoring, quiet)
    lap("data")
    cooked = recipe_stage(config, checked, scorer, quiet)
    mixture = cooked.result.mixture
    fields = {"recipe": recipe_info(cooked.recipe), **scored_fields(config, checked, scorer, plan, cooked)}
    if trainer is not None:  # trainer.model holds the soup afterwards, bit for bit as written
        scorer.workbench.load(mixture)
    overrides = {}
    if config.recalibrate_bn:
        overrides = recalibrated_statistics(scorer, mixture)
        fields["batchnorm"] = {"recalibrated_batches": config.recalibrate_bn, "tensors": sorted(overrides)}
    if scorer.head is not None:  # a backbone soup: its head, fitted (or kept) for the chosen body
        scorer.load(mixture)
        overrides = head_tensors(scorer)
        fields["backbone"] = {
            "head": config.head,
            "described": scorer.head.describe,
            "head_tensors": sorted(overrides),
            "feature_passes": scorer.head.passes,  # forward passes that fitted a probe
        }
    lap("soup")
    return ScoredRun(fields, cooked.result, scorer, overrides)


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


def recipe_stage(config: SoupConfig, checked: Checked, scorer: MixtureScorer, quiet: bool) -> Cooked:
    """Score every candidate on the selection split, then let the recipe choose the mixture."""
    singles = {cid: Mixture.uniform("single", [cid], checked.revisions) for cid in checked.ids}
    individual = {cid: scorer.selection_value(m) for cid, m in singles.items()}
    # Selection losses break ties on coarse metrics such as accuracy.
    losses = {cid: scorer.score(m, "selection").loss for cid, m in singles.items()}
    recipe = build_recipe(config, scored_context(checked, scorer, quiet, config))
    result = recipe.cook(
        checked.pool, individual, scorer.selection_value, checked.revisions, tie_break=losses
    )
    return Cooked(recipe, result, singles, rank(checked.ids, individual, losses), losses)


def scored_context(checked: Checked, scorer: MixtureScorer, quiet: bool, config: SoupConfig) -> RecipeContext:
    """`recipe_context`, plus (with hf-soup's own encoding of the data) the live model's trainer and the
    confirmation folds."""
    context = recipe_context(checked, quiet)
    split = scorer.splits["selection"]
    if split.features:
        context.mixing_trainer = _mixing_trainer(scorer, split, quiet)
        # Built only if a recipe asks (auto): other recipes never pay for the halves' scores.
        context.folds = lambda: confirmation_folds(scorer, checked, config, context)
    return context


def _mixing_trainer(scorer: MixtureScorer, split, quiet: bool):
    """`options -> MixingTrainer` on `split`: the learned soup's gradients through the live model."""
    return lambda options: MixingTrainer(
        scorer.workbench, split, scorer.collator, scorer.spec, options, quiet
    )


def confirmation_folds(
    scorer: MixtureScorer, checked: Checked, config: SoupConfig, context: RecipeContext
) -> list[Fold]:
    """The selection split in two seeded, disjoint halves, each with the candidates' scores on it, an objective on
    it (computed from the full selection logits, so a fold costs no forward pass of its own), and recipes built to
    train on it alone (the learned soup)."""
    selection = scorer.splits["selection"]
    order = np.random.default_rng(config.seed).permutation(len(selection))
    halves = (np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :]))
    folds = []
    for name, indices in zip(("A", "B"), halves):
        individual = {
            cid: scorer.subset_value(Mixture.uniform("single", [cid], checked.revisions), indices)
            for cid in checked.pool
        }
        on_half = replace(
            context,
            folds=None,
            mixing_trainer=_mixing_trainer(
                scorer, selection.subset(indices, f"{selection.name} ({name})"), context.quiet
            ),
        )
        on_half.build = lambda recipe, half=on_half: recipe_class(recipe).from_config(config, half)
        folds.append(
            Fold(
                name,
                individual,
                lambda mixture, _bar, rows=indices: scorer.subset_value(mixture, rows),
                build=on_half.build,
            )
        )
    return folds


def recalibrated_statistics(scorer: MixtureScorer, mixture: Mixture) -> dict[str, torch.Tensor]:
    """The soup's BatchNorm statistics re-estimated on the selection split, to be written instead of averages."""
    workbench = scorer.workbench
    workbench.load(mixture)  # `after_load` recalibrates
    state = workbench.model.state_dict()
    return {
        name: state[name].detach().cpu().clone()
        for name in workbench.after_load.buffer_names(workbench.model)
    }


def scored_fields(
    config: SoupConfig, checked: Checked, scorer: MixtureScorer, plan, cooked: Cooked
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
    if scorer.head is not None:  # a backbone soup's start: the base's body with the same kind of head
        start = Mixture("base", (), base=replace(checked.base, weight=1.0))
        fields["base_with_head"] = summary.entry(f"base + {scorer.head.describe}", start)
        others["base"] = start
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
    rows = [
        CandidateRow(
            cid,
            cid in kept,
            checked.excluded.get(cid),
            replace(summary.entry(cid, singles[cid]), id=cid),
            training[cid],
        )
        for cid in ranked
    ]
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


def _splits_info(scorer: MixtureScorer, plan, report_names: list[str]) -> SplitsInfo:
    return SplitsInfo(
        selection={"name": plan.selection_name, "size": len(scorer.splits["selection"])},
        report={name: {"size": len(scorer.splits[name])} for name in report_names},
        same_split=plan.same_split,
        notes=plan.notes,
    )


def _task_info(scorer: MixtureScorer) -> TaskInfo:
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


def _ties(scorer: MixtureScorer, ranked, selection, losses, best_id: str) -> list[dict]:
    """Ties on the selection metric, and the tie (if any) that decided the best individual's primary metric."""
    found = ties(
        ranked, {cid: scorer.value(s) for cid, s in selection.items()}, losses, scorer.selection_metric
    )
    primary = scorer.spec.primary_metric
    if scorer.selection_metric != primary:
        by_primary = {cid: scorer.primary_value(s) for cid, s in selection.items()}
        found += [
            t
            for t in ties(rank(ranked, by_primary, losses), by_primary, losses, primary)
            if best_id in t["candidates"]
        ]
    return found


def _details(result: RecipeResult, summary: Summary) -> dict[str, Any] | None:
    """The recipe's own record, with its curve (if any) scored on the report splits too."""
    if result.details is None:
        return None
    details = dict(result.details)
    if result.curve:
        details["curve"] = [
            {
                **point.fields,
                "selection_value": point.selection_value,
                **summary.entry(point.label, point.mixture).to_dict(),
            }
            for point in result.curve
        ]
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
