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

import json
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi

from .cache import JsonCache, cache_key, default_cache_dir
from .compat import CompatibilityReport, check_compatibility
from .config import SoupConfig
from .data import IMAGE_TASK
from .diagnostics import Diagnostics, diagnose
from .errors import IncompatibleCandidatesError, NoCandidatesError, OutputExistsError
from .hub import check_push_target, push
from .lora import require_lora_candidates
from .materialize import soup_dtype
from .mixture import Ingredient, Mixture
from .output import write_soup_folder
from .preparation import (
    evaluate_model,
    load_preprocessor,
    prepare_scorer,
    prepare_trainer_scorer,
    task_spec_of,
)
from .recipes import (
    LearnedOptions,
    LearnedSoup,
    MixingTrainer,
    RecipeResult,
    WiseSoup,
    get_recipe,
    parse_alphas,
    rank,
)
from .scoring import Scorer, process_state
from .summary import Summary, ties
from .trainer_scoring import trainer_label_names
from .verify import ingredient_fingerprints
from .weights import averaged

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


def check(
    base: str, candidates: list[str], allow_pickle: bool = False, trust_remote_code: bool = False
) -> CompatibilityReport:
    """Check candidates against each other and the base from configs and tensor headers only: no weight file
    of a Hub candidate or base is downloaded."""
    report, _ = check_compatibility(
        base, candidates, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, download=False
    )
    return report


def check_with_diagnostics(
    base: str,
    candidates: list[str],
    allow_pickle: bool = False,
    quiet: bool = False,
    trust_remote_code: bool = False,
) -> tuple[CompatibilityReport, Diagnostics]:
    """`check`, then each accepted candidate's distance to the base and the angles between their task vectors.

    Unlike `check`, this reads every weight (streamed, tensor by tensor).
    """
    report, sources = check_compatibility(
        base, candidates, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    report.raise_if_unusable(minimum=1)
    return report, diagnose(report, sources, quiet=quiet)


def cook(
    config: SoupConfig | None = None,
    *,
    trainer=None,
    report_dataset=None,
    command: str | None = None,
    quiet: bool = False,
    **kwargs,
) -> SoupResult:
    """Build, evaluate and (with `output`) write a soup.

    Args:
        config (`SoupConfig`, *optional*): the run's options; or pass them as keyword arguments.
        trainer (`transformers.Trainer`, *optional*): score with this trainer instead of hf-soup's data pipeline:
            its `eval_dataset` is the selection split, its collator and `compute_metrics` score, and
            `metric_for_best_model` / `greater_is_better` rank. Afterwards `trainer.model` holds the soup.
        report_dataset (`Dataset`, *optional*): with `trainer`, a tokenized dataset to report on; without it,
            the report uses the selection split and says so.
        command (`str`, *optional*): the command line to record in the manifest.
        quiet (`bool`, *optional*, defaults to `False`): no progress bars.

    Example:
    ```python
    >>> result = cook(base="./minilm", candidates=["./pot/*"], trainer=trainer, recipe="greedy", output="./soup")
    ```

    Returns:
        `SoupResult`: the report (candidates with selection and report scores, `best_individual`, `uniform`,
        `soup`, `mixture`, `output`), the mixture and where it was written.
    """
    if trainer is not None:
        config = (
            replace(config, scored_by_trainer=True)
            if config
            else SoupConfig(**kwargs, scored_by_trainer=True)
        )
    config = config or SoupConfig(**kwargs)
    if trainer is not None and config.recalibrate_bn:
        from .errors import ConfigError

        raise ConfigError(
            "--recalibrate-bn runs batches of hf-soup's own encoding of the selection split; with "
            "cook(trainer=...) pass the data as dataset= instead of a trainer, or leave recalibrate_bn at 0."
        )
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
        return _cook(config, output, api, command, quiet, started, timings, (trainer, report_dataset))
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _cook(
    config: SoupConfig, output: Path | None, api, command, quiet, started, timings, scoring
) -> SoupResult:
    trainer = scoring[0]
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
    diagnostics = _diagnostics(compatibility, sources, fingerprints, cache, quiet)
    excluded = _excluded_candidates(config, diagnostics)
    timings["check"] = time.perf_counter() - started

    revisions = {c.id: c.revision for c in compatibility.accepted}
    ids = [c.id for c in compatibility.accepted]
    pool = [cid for cid in ids if cid not in excluded]  # what recipes may put in the soup
    image = (config.task or "").lower() == IMAGE_TASK
    preprocessor, preprocessor_dir = load_preprocessor(compatibility, image)
    dtype = soup_dtype(compatibility, sources, config.dtype)

    report: dict[str, Any] = {
        "recipe": _describe(get_recipe("uniform")),  # an unscored run is a plain uniform merge
        "base": config.base,
        "compatibility": compatibility.to_dict(),
        "command": command or " ".join(sys.argv),
        "config": config.to_dict(),
        "excluded": excluded,
        "dtype": str(dtype).removeprefix("torch."),  # the soup is written and scored in it
    }
    recipe_result: RecipeResult | None = None
    scorer: Scorer | None = None
    overrides: dict[str, torch.Tensor] = {}

    if not config.scored:
        mixture = Mixture.uniform("uniform", pool, revisions)
        report.update({"task": None, "splits": None, "candidates": [
            {"id": i, "kept": i in pool, "excluded": excluded.get(i)} for i in ids
        ]})  # fmt: skip
        report.update({"best_individual": None, "uniform": None, "soup": None, "ensembles": None})
    else:
        scorer, plan = _prepare_scoring(config, scoring, compatibility, sources, fingerprints, preprocessor,
                                        cache, quiet)  # fmt: skip
        timings["data"] = time.perf_counter() - started - sum(timings.values())
        singles = {cid: Mixture.uniform("single", [cid], revisions) for cid in ids}
        individual = {cid: scorer.selection_value(m) for cid, m in singles.items()}
        # Selection losses break ties on coarse metrics such as accuracy.
        losses = {cid: scorer.score(m, "selection").loss for cid, m in singles.items()}
        recipe = _make_recipe(config, compatibility, sources, scorer, quiet)
        recipe_result = recipe.cook(pool, individual, scorer.selection_value, revisions, tie_break=losses)
        mixture = recipe_result.mixture
        ranked = rank(ids, individual, losses)
        report.update(_scored_report(config, scorer, plan, recipe, recipe_result, ranked, singles, excluded,
                                     compatibility))  # fmt: skip
        if trainer is not None:  # trainer.model holds the soup afterwards, bit for bit as written
            scorer.workbench.load(mixture)
        if config.recalibrate_bn:
            overrides = _recalibrated_statistics(scorer, mixture)
            report["batchnorm"] = {
                "recalibrated_batches": config.recalibrate_bn,
                "tensors": sorted(overrides),
            }
        timings["soup"] = time.perf_counter() - started - sum(timings.values())

    report["diagnostics"] = diagnostics.to_dict()
    for message in diagnostics.warnings():
        logger.warning("Shared initialisation: %s", message)
    report["warnings"] = [*(report.get("warnings") or []), *diagnostics.warnings()]
    if mixture.base is None:
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
    state = process_state()
    report["processes"] = state.num_processes  # evaluation was sharded across this many processes
    main_process = state.is_main_process  # under `accelerate launch`, only rank 0 writes and pushes
    if output is not None and main_process:
        write_soup_folder(
            output,
            config,
            report,
            mixture,
            compatibility,
            sources,
            preprocessor,
            preprocessor_dir,
            quiet,
            overrides,
        )
        timings["write"] = time.perf_counter() - started - sum(timings.values())
    report["output"] = str(output) if config.output else None
    if config.push_to and main_process:
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


def _excluded_candidates(config: SoupConfig, diagnostics: Diagnostics) -> dict[str, str]:
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


def _prepare_scoring(config, scoring, compatibility, sources, fingerprints, preprocessor, cache, quiet):
    """The `Scorer` (hf-soup's data pipeline, or the user's Trainer) and the split plan."""
    trainer, report_dataset = scoring
    if trainer is not None:
        return prepare_trainer_scorer(trainer, report_dataset, compatibility, sources, fingerprints,
                                      None if config.no_cache else cache)  # fmt: skip
    return prepare_scorer(config, task_spec_of(config), compatibility, sources, fingerprints, preprocessor,
                          cache, quiet)  # fmt: skip


def _scored_report(config, scorer, plan, recipe, recipe_result, ranked, singles, excluded, compatibility):
    """The scored part of the report: every candidate (`ranked` by the selection metric), the best individual
    (the paper's: the best primary metric on the selection split; ties by selection loss, then id), the soup,
    the baselines, and the paired comparisons against that best individual."""
    spec = scorer.spec
    mixture = recipe_result.mixture
    summary = Summary(scorer, singles)
    selection = {cid: scorer.score(singles[cid], "selection") for cid in ranked}
    losses = {cid: score.loss for cid, score in selection.items()}
    best_id = rank(ranked, {cid: scorer.primary_value(score) for cid, score in selection.items()}, losses)[0]
    pool = [cid for cid in ranked if cid not in excluded]
    revisions = {cid: m.ingredients[0].revision for cid, m in singles.items()}
    uniform = Mixture.uniform("uniform", pool, revisions)
    kept = {i.id for i in mixture.ingredients if i.weight != 0}
    training = {c.id: _training_record(c.local_dir) for c in compatibility.accepted}
    report: dict[str, Any] = {"recipe": _describe(recipe)}
    report["candidates"] = [
        {**summary.entry(cid, singles[cid]), "id": cid, "kept": cid in kept, "excluded": excluded.get(cid),
         "training": training[cid]}
        for cid in ranked
    ]  # fmt: skip
    report["best_individual"] = {**summary.entry(best_id, singles[best_id]), "id": best_id}
    if ranked[0] != best_id and scorer.selection_metric != spec.primary_metric:
        # The recipe's own ranking picked another single model: shown, never compared against.
        report["best_by_selection_metric"] = {**summary.entry(ranked[0], singles[ranked[0]]), "id": ranked[0]}
    report["oracle"] = _oracle(summary, singles, ranked)
    report["uniform"] = summary.entry("uniform soup", uniform)
    report["soup"] = summary.entry(f"{recipe.name()} soup", mixture)
    soup_ids = [cid for cid in ranked if cid in kept]
    report["ensembles"] = [summary.ensemble(f"ensemble of all {len(ranked)} candidates", ranked)]
    if soup_ids != ranked and len(soup_ids) > 1:
        report["ensembles"].append(
            summary.ensemble(f"ensemble of the {len(soup_ids)} soup ingredients", soup_ids)
        )
    report["task"] = {
        "name": spec.name,
        "metrics": list(spec.metrics),
        "primary_metric": spec.primary_metric,
        "selection_metric": scorer.selection_metric,
        "positive_label": getattr(spec, "positive_label", None),
        "dataset": spec.dataset or "",
        "dataset_config": spec.dataset_config,
    }
    report["splits"] = {
        "selection": {"name": plan.selection_name, "size": len(scorer.splits["selection"])},
        "report": {name: {"size": len(scorer.splits[name])} for name in summary.report_names},
        "same_split": plan.same_split,
        "notes": plan.notes,
    }
    report["trajectory"] = [vars(step) for step in recipe_result.trajectory]
    report["comparisons"] = summary.comparisons(
        singles[best_id],
        {"soup": mixture, "uniform": uniform, "ensemble": ranked},
        resamples=config.bootstrap,
        seed=config.seed,
    )
    report["ties"] = ties(
        ranked, {cid: scorer.value(s) for cid, s in selection.items()}, losses, scorer.selection_metric
    )
    if scorer.selection_metric != spec.primary_metric:  # the best individual's own ranking can tie too
        by_primary = {cid: scorer.primary_value(s) for cid, s in selection.items()}
        best_group = [t for t in ties(rank(ranked, by_primary, losses), by_primary, losses, spec.primary_metric)
                      if best_id in t["candidates"]]  # fmt: skip
        report["ties"] += best_group  # only the tie that decided the best individual
    report["warnings"] = [*getattr(plan, "warnings", []), *summary.warnings(ranked)]
    report.update(_recipe_details(recipe, mixture, summary))
    return report


def _oracle(summary: Summary, singles: dict[str, Mixture], ids: list[str]) -> dict[str, Any] | None:
    """The candidate that is best on the first report split: chosen by looking at the answers, so a labelled row
    for context, never a claim."""
    if not summary.report_names:
        return None
    split = summary.report_names[0]
    scores = {cid: summary.scorer.score(singles[cid], split) for cid in ids}
    values = {cid: summary.scorer.primary_value(score) for cid, score in scores.items()}
    oracle = rank(ids, values, {cid: score.loss for cid, score in scores.items()})[0]
    return {**summary.entry(oracle, singles[oracle]), "id": oracle, "split": split}


def _recalibrated_statistics(scorer: Scorer, mixture: Mixture) -> dict[str, torch.Tensor]:
    """The soup's BatchNorm statistics re-estimated on the selection split, to be written instead of averages."""
    workbench = scorer.workbench
    workbench.load(mixture)  # `after_load` recalibrates
    state = workbench.model.state_dict()
    return {name: state[name].detach().cpu().clone()
            for name in workbench.after_load.buffer_names(workbench.model)}  # fmt: skip


def _training_record(folder: Path) -> dict | None:
    """What `SoupCallback` recorded about how a candidate was trained (hyperparameters, metrics), if anything."""
    from .integrations import INGREDIENT_FILE

    path = Path(folder) / INGREDIENT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _describe(recipe) -> dict[str, str]:
    return {
        "name": recipe.name(),
        "pretty_name": recipe.pretty_name(),
        "reference_url": recipe.reference_url(),
    }


def _make_recipe(
    config: SoupConfig, compatibility: CompatibilityReport, sources, scorer: Scorer, quiet: bool
):
    """The recipe of `config`; WiSE-FT and learned soups also need the base and the live model."""
    if config.recipe == "wise":
        reference = sources[compatibility.accepted[0].id]
        headless = [n for n in reference.keys()
                    if n not in compatibility.base_names and averaged(reference.dtype(n))]  # fmt: skip
        base = Ingredient(compatibility.base.id, 0.0, compatibility.base.revision)
        endpoint = get_recipe(config.wise_of, passes=config.passes)
        return WiseSoup(endpoint, parse_alphas(config.alpha), base, headless)
    if config.recipe == "learned":
        if not scorer.splits["selection"].features:
            from .errors import ConfigError

            raise ConfigError(
                "--recipe learned trains on hf-soup's own encoding of the selection split; with cook(trainer=...) "
                "use greedy, pruned, uniform or wise, or pass the data as dataset= instead of a trainer."
            )
        options = LearnedOptions(
            config.granularity, config.learn_epochs, config.learn_lr, config.learn_batch_size, config.seed
        )
        trainer = MixingTrainer(
            scorer.workbench,
            scorer.splits["selection"],
            scorer.collator,
            scorer.spec.regression,
            options,
            quiet,
        )
        return LearnedSoup(trainer)
    return get_recipe(config.recipe, passes=config.passes)


def _recipe_details(recipe, mixture: Mixture, summary: Summary) -> dict[str, Any]:
    """What a WiSE-FT or learned soup adds to the report: the α curve, or the learned weights."""
    if isinstance(recipe, WiseSoup):
        curve = []
        for alpha, trial, selection in recipe.curve:
            entry = summary.entry(f"alpha={alpha:g}", trial)
            curve.append({"alpha": alpha, "selection_value": selection, **entry})
        return {
            "wise": {
                "alpha": WiseSoup.alpha_of(mixture),
                "endpoint": recipe.endpoint.name(),
                "endpoint_mixture": recipe.endpoint_mixture.to_dict(),
                "head": "the fine-tuned endpoint's head, at every alpha (the base has none of these labels)"
                if recipe.headless
                else "interpolated like the body: the base's own head has the same labels (rows aligned by name)",
                "curve": curve,
            }
        }
    if isinstance(recipe, LearnedSoup) and recipe.state is not None:
        return {"learned": recipe.state.to_dict()}
    return {}


def _diagnostics(compatibility, sources, fingerprints, cache: JsonCache, quiet: bool) -> Diagnostics:
    """Distances and angles to the base, cached by the content of the base and the candidates."""
    ids = [c.id for c in compatibility.accepted]
    key = cache_key("diagnostics", fingerprints["__base__"], [fingerprints[i] for i in ids])
    if (hit := cache.get(key)) is not None:
        return Diagnostics.from_dict(hit)
    diagnostics = diagnose(compatibility, sources, quiet=quiet)
    cache.put(key, diagnostics.to_dict())
    return diagnostics


__all__ = ["SoupResult", "check", "check_with_diagnostics", "cook", "evaluate_model"]
