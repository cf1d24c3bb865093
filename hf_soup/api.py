"""The pipeline, stage by stage: candidates → compatibility → scores → recipe → mixture → soup folder.

```python
>>> from hf_soup import SoupConfig, cook
>>> result = cook(SoupConfig(base="./minilm", candidates=["./runs/*"], dataset="train.csv",
...                          report_split="test.csv", text_column="review", label_column="score",
...                          recipe="greedy", output="./soup"))
>>> result.report["soup"]["report"]
```
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import HfApi
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from .cache import JsonCache, default_cache_dir
from .compat import CompatibilityReport, check_compatibility
from .config import SoupConfig
from .data import TaskSpec, plan_splits, task_spec
from .errors import OutputExistsError
from .hub import check_push_target, push
from .materialize import Workbench
from .mixture import Ingredient, Mixture
from .output import write_soup_folder
from .recipes import RecipeResult, get_recipe, rank
from .scoring import Scorer, encode_split
from .stats import compare, small_split_warning
from .verify import ingredient_fingerprints

logger = logging.getLogger(__name__)


@dataclass
class SoupResult:
    """What `cook` returns: the JSON report (also written into `soup.json`), the mixture and the output path."""

    report: dict[str, Any]
    mixture: Mixture
    output: Path | None
    compatibility: CompatibilityReport
    recipe_result: RecipeResult | None = None
    cache_hits: int = 0
    cache_misses: int = 0
    evaluations: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def check(base: str, candidates: list[str], allow_pickle: bool = False) -> CompatibilityReport:
    """Check candidates against each other and the base from configs and tensor headers only."""
    report, _ = check_compatibility(base, candidates, allow_pickle=allow_pickle)
    return report


def _load_tokenizer(report: CompatibilityReport):
    for folder in (report.base.local_dir, report.accepted[0].local_dir):
        try:
            return AutoTokenizer.from_pretrained(folder), folder
        except (OSError, ValueError, TypeError):
            continue
    return None, None


def _entry(name: str, mixture: Mixture, selection, reports: dict) -> dict[str, Any]:
    return {
        "name": name,
        "ingredients": mixture.ids(),
        "selection": selection.metrics if selection else None,
        "selection_loss": selection.loss if selection else None,
        "report": {split: score.metrics for split, score in reports.items()},
        "report_loss": {split: score.loss for split, score in reports.items()},
    }


def cook(
    config: SoupConfig | None = None, *, command: str | None = None, quiet: bool = False, **kwargs
) -> SoupResult:
    """Build, evaluate and (with `output`) write a soup.

    Args:
        config (`SoupConfig`, *optional*): the run's options; or pass them as keyword arguments.
        command (`str`, *optional*): the command line to record in the manifest.
        quiet (`bool`, *optional*, defaults to `False`): no progress bars.

    Returns:
        `SoupResult`: the report (candidates with selection and report scores, `best_individual`, `uniform`,
        `soup`, `mixture`, `output`), the mixture and where it was written.
    """
    config = config or SoupConfig(**kwargs)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    output = Path(config.output) if config.output else None
    if output is not None and output.exists() and not config.overwrite:
        raise OutputExistsError(
            f"{output} already exists; pass --overwrite to replace it, or choose another --output."
        )

    api = HfApi()
    if config.push_to:  # before any work: a push that would be refused must not cost a whole run
        check_push_target(config.push_to, config.overwrite, api)
    staging = None
    if config.push_to and output is None:
        staging = tempfile.mkdtemp(prefix="hf-soup-push-")
        output = Path(staging) / config.push_to.split("/")[-1]
    try:
        return _cook(config, output, api, command, quiet, started, timings)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _cook(config: SoupConfig, output: Path | None, api, command, quiet, started, timings) -> SoupResult:
    compatibility, sources = check_compatibility(
        config.base, config.candidates, allow_pickle=config.allow_pickle, api=api
    )
    compatibility.raise_if_unusable(strict=config.strict)
    timings["check"] = time.perf_counter() - started

    cache = JsonCache(Path(config.cache_dir) if config.cache_dir else default_cache_dir())
    fingerprints = ingredient_fingerprints(compatibility, sources, cache, quiet=quiet)
    revisions = {c.id: c.revision for c in compatibility.accepted}
    ids = [c.id for c in compatibility.accepted]
    recipe = get_recipe(config.recipe, passes=config.passes)
    tokenizer, tokenizer_dir = _load_tokenizer(compatibility)

    report: dict[str, Any] = {
        "recipe": {
            "name": recipe.name(),
            "pretty_name": recipe.pretty_name(),
            "reference_url": recipe.reference_url(),
        },
        "base": config.base,
        "compatibility": compatibility.to_dict(),
        "command": command or " ".join(sys.argv),
        "config": config.to_dict(),
    }
    recipe_result: RecipeResult | None = None
    scorer: Scorer | None = None

    if not config.scored:
        mixture = Mixture.uniform("uniform", ids, revisions)
        report.update({"task": None, "splits": None, "candidates": [{"id": i, "kept": True} for i in ids]})
        report.update({"best_individual": None, "uniform": None, "soup": None, "ensemble": None})
    else:
        spec = task_spec(
            config.task, config.dataset, config.text_column, config.text_pair_column, config.label_column
        )
        scorer, plan = _prepare_scorer(
            config, spec, compatibility, sources, fingerprints, tokenizer, cache, quiet
        )
        timings["data"] = time.perf_counter() - started - sum(timings.values())

        def selection(mixture: Mixture):
            return scorer.score(mixture, "selection")

        singles = {cid: Mixture.uniform("single", [cid], revisions) for cid in ids}
        individual = {cid: scorer.selection_value(m) for cid, m in singles.items()}
        losses = {cid: selection(m).loss for cid, m in singles.items()}  # breaks ties on coarse metrics
        recipe_result = recipe.cook(ids, individual, scorer.selection_value, revisions, tie_break=losses)
        mixture = recipe_result.mixture
        ranked = rank(ids, individual, losses)
        uniform = Mixture.uniform("uniform", ranked, revisions)
        best_id = ranked[0]
        report_names = [name for name in scorer.splits if name != "selection"]

        def reports(m: Mixture) -> dict:
            return {name: scorer.score(m, name) for name in report_names}

        kept = set(mixture.ids())
        report["candidates"] = [
            {
                **_entry(cid, singles[cid], selection(singles[cid]), reports(singles[cid])),
                "id": cid,
                "kept": cid in kept,
            }
            for cid in ranked
        ]
        report["best_individual"] = _entry(
            best_id, singles[best_id], selection(singles[best_id]), reports(singles[best_id])
        )
        report["uniform"] = _entry("uniform soup", uniform, selection(uniform), reports(uniform))
        report["soup"] = _entry(f"{recipe.name()} soup", mixture, selection(mixture), reports(mixture))
        report["task"] = {
            "name": spec.name,
            "metrics": list(spec.metrics),
            "primary_metric": spec.primary_metric,
            "selection_metric": scorer.selection_metric,
            "dataset": spec.dataset or "",
            "dataset_config": spec.dataset_config,
        }
        report["splits"] = {
            "selection": {"name": plan.selection_name, "size": len(scorer.splits["selection"])},
            "report": {name: {"size": len(scorer.splits[name])} for name in report_names},
            "same_split": plan.same_split,
            "notes": plan.notes,
        }
        report["trajectory"] = [vars(step) for step in recipe_result.trajectory]
        report["comparisons"] = _comparisons(scorer, report_names, singles[best_id], uniform, mixture, config)
        report["ties"] = _ties(ranked, individual, losses)
        report["warnings"] = _warnings(scorer, spec, [selection(singles[c]) for c in ids])
        timings["soup"] = time.perf_counter() - started - sum(timings.values())

    mixture = replace(mixture, base=Ingredient(compatibility.base.id, 0.0, compatibility.base.revision))
    report["mixture"] = mixture.to_dict()
    report["cache"] = {
        "hits": cache.hits,
        "misses": cache.misses,
        "evaluations": scorer.evaluations if scorer else 0,
        "examples_forwarded": scorer.examples_forwarded if scorer else 0,
        "early_stops": scorer.early_stops if scorer else 0,
        "forward_passes": scorer.log if scorer else [],
    }
    if output is not None:
        write_soup_folder(
            output, config, report, mixture, compatibility, sources, tokenizer, tokenizer_dir, quiet
        )
        timings["write"] = time.perf_counter() - started - sum(timings.values())
    report["output"] = str(output) if config.output else None
    if config.push_to:
        message = f"hf-soup: {mixture.recipe} soup of {len(mixture.ingredients)} ingredients"
        report["push"] = push(output, config.push_to, config.private, message, api)
        logger.info("Pushed to %s", report["push"]["commit_url"])
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return SoupResult(
        report=report,
        mixture=mixture,
        output=output,
        compatibility=compatibility,
        recipe_result=recipe_result,
        cache_hits=cache.hits,
        cache_misses=cache.misses,
        evaluations=scorer.evaluations if scorer else 0,
        timings=timings,
    )


def _comparisons(scorer: Scorer, splits, best: Mixture, uniform: Mixture, soup: Mixture, config) -> dict:
    """Paired differences vs the best individual on each report split, from the predictions already made."""
    out = {}
    for split in splits:
        encoded, reference = scorer.splits[split], scorer.score(best, split)
        out[split] = {}
        for name, mixture in (("soup", soup), ("uniform", uniform)):
            out[split][name] = compare(
                scorer.spec.metrics,
                encoded.labels,
                np.asarray(scorer.score(mixture, split).predictions),
                np.asarray(reference.predictions),
                resamples=config.bootstrap,
                seed=config.seed,
                pos_label=encoded.pos_label,
            )
    return out


def _ties(ranked: list[str], individual: dict[str, float], losses: dict[str, float]) -> list[dict]:
    """Groups of candidates with the same selection score, in the order the tie was broken."""
    groups: dict[float, list[str]] = {}
    for cid in ranked:
        groups.setdefault(individual[cid], []).append(cid)
    return [
        {
            "score": score,
            "candidates": members,
            "losses": [losses[c] for c in members],
            "broken_by": "selection loss, then candidate id",
        }
        for score, members in groups.items()
        if len(members) > 1
    ]


def _warnings(scorer: Scorer, spec: TaskSpec, singles) -> list[str]:
    warnings = []
    if "accuracy" in spec.metrics:
        scores = [s.metrics["accuracy"] for s in singles]
        message = small_split_warning(scores, len(scorer.splits["selection"]))
        if message:
            logger.warning(message)
            warnings.append(message)
    return warnings


def _prepare_scorer(config, spec: TaskSpec, compatibility, sources, fingerprints, tokenizer, cache, quiet):
    from .errors import ConfigError

    if tokenizer is None:
        raise ConfigError(
            f"Neither the base {config.base} nor {compatibility.accepted[0].id} has tokenizer files; "
            "save the tokenizer next to the base model (`tokenizer.save_pretrained(base_dir)`)."
        )
    plan = plan_splits(
        spec,
        selection_split=config.selection_split,
        report_split=config.report_split,
        selection_fraction=config.selection_fraction,
        seed=config.seed,
        max_eval_examples=config.max_eval_examples,
    )
    for note in plan.notes:
        logger.warning(note)
    reference = compatibility.accepted[0]
    encode = {
        "model_labels": compatibility.label_names,
        "num_labels": reference.num_labels,
        "max_length": config.max_length,
        "tokenizer": tokenizer,
        "spec": spec,
    }
    splits = {"selection": encode_split("selection", plan.selection, **encode)}
    for name, data in plan.reports.items():
        splits[name] = encode_split(name, data, **encode)
    model = AutoModelForSequenceClassification.from_pretrained(reference.local_dir, dtype=torch.float32)
    workbench = Workbench(model, compatibility, sources)
    collator = DataCollatorWithPadding(tokenizer)
    scorer = Scorer(
        workbench,
        spec,
        splits,
        fingerprints,
        collator,
        None if config.no_cache else cache,
        config.batch_size,
        quiet,
        selection_metric=config.selection_metric,
        early_rejection=not config.no_early_rejection,
    )
    return scorer, plan


def evaluate_model(model_dir: str, options: dict[str, Any], quiet: bool = False) -> dict[str, dict]:
    """Score one model folder on the report split(s) of a task, as `hf-soup evaluate` does.

    Args:
        model_dir (`str`): a folder written by `save_pretrained`, with tokenizer files.
        options (`dict`): `task` or `dataset` (+ columns), and optionally `report_split`, `max_length`, ...
    """
    from .candidates import load_candidate
    from .errors import ConfigError
    from .scoring import predict, score_logits

    candidate = load_candidate(model_dir)
    spec = task_spec(
        options.get("task"),
        options.get("dataset"),
        options.get("text_column"),
        options.get("text_pair_column"),
        options.get("label_column"),
    )
    plan = plan_splits(
        spec,
        selection_split=options.get("selection_split"),
        report_split=options.get("report_split"),
        selection_fraction=options.get("selection_fraction") or 0.1,
        seed=options.get("seed") or 0,
        max_eval_examples=options.get("max_eval_examples"),
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(
            f"{model_dir} has no usable tokenizer files ({error}); save the tokenizer with the model."
        ) from error
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    collator = DataCollatorWithPadding(tokenizer)
    scores = {}
    for name, data in plan.reports.items():
        split = encode_split(
            name,
            data,
            spec,
            tokenizer,
            candidate.label_names,
            candidate.num_labels,
            options.get("max_length") or 128,
        )
        logits = predict(model, split, collator, options.get("batch_size") or 64, quiet)
        result = score_logits(logits, split, spec)
        scores[name] = {"metrics": result.metrics, "loss": result.loss, "n": result.n}
    return scores
