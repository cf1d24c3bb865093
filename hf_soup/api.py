"""The pipeline, stage by stage: candidates → compatibility → scores → recipe → mixture → soup folder.

```python
>>> from hf_soup import SoupConfig, cook
>>> result = cook(SoupConfig(base="./minilm", candidates=["./runs/*"], dataset="train.csv",
...                          report_split="test.csv", text_column="review", label_column="score",
...                          recipe="greedy", output="./soup"))
>>> result.summary.soup.report
```
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from .candidates.compat import CompatibilityReport, check_compatibility
from .candidates.diagnostics import Diagnostics, diagnose
from .candidates.hub import check_push_target, push
from .checkpoints.sources import SoupSources
from .config import SoupConfig, split_options
from .errors import ConfigError, OutputExistsError
from .evaluation.preprocessors import load_preprocessor
from .merge.materialize import soup_dtype
from .mixture import Mixture
from .pipeline.output import staged_soup_folder, write_soup_folder
from .pipeline.single_pass import check_and_write, single_pass_inputs
from .pipeline.stages import (
    Checked,
    compatible_stage,
    data_free_stage,
    recipe_info,
    unscored_rows,
    verified_stage,
)
from .recipes import RecipeResult
from .results import SoupSummary, WrittenFiles
from .runtime import process_state

logger = logging.getLogger(__name__)


@dataclass
class SoupResult:
    """What `cook` returns: the typed summary (also written into `soup.json`), where the soup went, and what
    was written and pushed."""

    summary: SoupSummary
    output: Path | None
    compatibility: CompatibilityReport
    recipe_result: RecipeResult | None = None
    written: WrittenFiles | None = None
    push: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    bytes_read: dict[str, int] = field(default_factory=dict)  # tensor bytes read from the inputs, per stage
    requested_output: str | None = None  # `--output` as given (None when only staged for a push)

    @property
    def mixture(self) -> Mixture:
        return self.summary.mixture

    @property
    def cache_hits(self) -> int:
        return self.summary.cache["hits"]

    @property
    def cache_misses(self) -> int:
        return self.summary.cache["misses"]

    @property
    def evaluations(self) -> int:
        return self.summary.cache["evaluations"]

    @property
    def report(self) -> dict[str, Any]:
        """The JSON report (`hf-soup --format json`): the summary, plus where it was written and pushed."""
        data = {**self.summary.to_dict(), "output": self.requested_output}
        if self.written is not None:
            data.update(
                files=self.written.files, plots=self.written.plots, tensor_sha256=self.written.tensor_sha256
            )
        if self.push is not None:
            data["push"] = self.push
        data["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        data["bytes_read"] = dict(self.bytes_read)
        return data


class _Stopwatch:
    """Wall time per stage: each `lap(name)` records the time since the previous one, and with `sources`, the
    tensor bytes read from the inputs since then."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.bytes_read: dict[str, int] = {}
        self._last = time.perf_counter()
        self._read = 0
        self.sources: SoupSources | None = None  # counted from the first lap that names them

    def lap(self, name: str, sources: SoupSources | None = None) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self._last
        self._last = now
        self.sources = sources = sources or self.sources
        if sources is not None:
            total = sources.bytes_read()
            self.bytes_read[name] = total - self._read
            self._read = total


def check(
    base: str,
    candidates: list[str],
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    soup: str = "full",
) -> CompatibilityReport:
    """Check candidates against each other and the base from configs and tensor headers only: no weight file
    of a Hub candidate or base is downloaded. `soup="backbone"` compares their shared bodies only."""
    report, _ = check_compatibility(
        base,
        candidates,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        hub_weights="headers",
        soup=soup,
    )
    return report


def check_with_diagnostics(
    base: str,
    candidates: list[str],
    allow_pickle: bool = False,
    quiet: bool = False,
    trust_remote_code: bool = False,
    soup: str = "full",
) -> tuple[CompatibilityReport, Diagnostics]:
    """`check`, then each accepted candidate's distance to the base and the angles between their task vectors.

    Unlike `check`, this reads every weight (streamed, tensor by tensor).
    """
    report, sources = check_compatibility(
        base, candidates, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, soup=soup
    )
    report.raise_if_unusable(minimum=1)
    return report, diagnose(sources, quiet=quiet)


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
        `SoupResult`: the `SoupSummary` (candidates with selection and report scores, the best individual,
            the uniform soup, the soup, the baselines and comparisons, the mixture), and where it was written.
    """
    config = _config_of(config, trainer, kwargs)
    output = Path(config.output) if config.output else None
    if output is not None and output.exists() and not config.overwrite:
        raise OutputExistsError(
            f"{output} already exists; pass --overwrite to replace it, or choose another --output."
        )
    api = HfApi()
    if config.push_to:  # before any work: a push that would be refused must not cost a whole run
        check_push_target(config.push_to, config.overwrite, api)
    staging = tempfile.mkdtemp(prefix="hf-soup-push-") if config.push_to and output is None else None
    if staging is not None:
        output = Path(staging) / config.push_to.split("/")[-1]
    run = _Run(
        config, output, api, trainer, report_dataset, command=command or " ".join(sys.argv), quiet=quiet
    )
    try:
        result = _cook(run)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    if staging is not None:  # staged only for the push, and removed: nothing was written where the user looks
        return replace(result, output=None, requested_output=None)
    return replace(result, requested_output=str(output) if output is not None else None)


def _config_of(config: SoupConfig | None, trainer, kwargs: dict) -> SoupConfig:
    """The run's options: `config`, with any keyword options applied over it (`cook(config, recipe="uniform")`),
    or the keyword options alone."""
    kwargs = split_options(kwargs, config.recipe_options if config is not None else {})
    if trainer is not None:
        kwargs = {**kwargs, "scored_by_trainer": True}
    config = replace(config, **kwargs) if config is not None else SoupConfig(**kwargs)
    if trainer is not None and config.recalibrate_bn:
        raise ConfigError(
            "--recalibrate-bn runs batches of hf-soup's own encoding of the selection split; with "
            "cook(trainer=...) pass the data as dataset= instead of a trainer, or leave recalibrate_bn at 0."
        )
    return config


@dataclass
class _Run:
    """One `cook` call: its options, where it writes, and how it scores."""

    config: SoupConfig
    output: Path | None
    api: HfApi
    trainer: Any = None
    report_dataset: Any = None
    command: str = ""
    quiet: bool = False


def _cook(run: _Run) -> SoupResult:
    config, output, api, quiet = run.config, run.output, run.api, run.quiet
    clock = _Stopwatch()
    scored = _scored_stages() if config.scored else None
    label_order = scored.label_order(run.trainer) if scored else None
    main_process = process_state().is_main_process  # under `accelerate launch`, only rank 0 writes and pushes
    writes = output is not None and main_process
    # A staging folder opened in this block (the single pass) moves into place at its end.
    with contextlib.ExitStack() as stack:
        opened = compatible_stage(config, api, label_order=label_order)
        clock.lap("check", opened[1])
        checked, staged = _verified(run, opened, writes, stack)
        clock.lap("verify and merge" if staged else "verify", checked.sources)
        preprocessor, preprocessor_dir = load_preprocessor(checked.compatibility, config.image_task)
        summary, recipe_result, overrides = _summary(run, checked, preprocessor, clock)
        for message in checked.diagnostics.warnings():
            logger.warning("Shared initialisation: %s", message)
        written = None
        if writes:
            written = write_soup_folder(
                output,
                config,
                summary,
                checked,
                (preprocessor, preprocessor_dir),
                quiet=quiet,
                overrides=overrides,
                staged=staged,
            )
            summary = replace(summary, lora=written.lora)
    if writes:
        clock.lap("write" if staged else "merge and write")
    pushed = None
    if config.push_to and main_process:
        pushed = push(output, config.push_to, config.private, api)
        logger.info("Pushed to %s", pushed["commit_url"])
    return SoupResult(
        summary,
        output,
        checked.compatibility,
        recipe_result,
        written=written,
        push=pushed,
        timings=clock.timings,
        bytes_read=clock.bytes_read,
    )


def _verified(run: _Run, opened: tuple, writes: bool, stack: contextlib.ExitStack):
    """`(Checked, staged)`: the candidates verified; on a first data-free run, with the soup's weights already
    written from the same reads into a staging folder (`staged`: the folder and its weights; otherwise None)."""
    config = run.config
    cached = single_pass_inputs(config, opened, writes)
    if cached is None:
        return verified_stage(config, *opened, run.quiet), None
    sources = opened[1]
    dtype = soup_dtype(sources, config.dtype)
    staging = stack.enter_context(staged_soup_folder(run.output, config, sources, dtype))
    checked, weights = check_and_write(config, opened, cached, staging, quiet=run.quiet)
    return checked, (staging, weights)


def _scored_stages():
    """The scored stages, imported only when data is scored: evaluation's imports (`evaluate`, `datasets`, the
    models' classes) take seconds that a plain merge never needs."""
    from .pipeline import scored_stages

    return scored_stages


def _summary(run: _Run, checked: Checked, preprocessor, clock: _Stopwatch):
    """`(SoupSummary, RecipeResult or None, BatchNorm overrides)`: scored with data, or a plain uniform merge."""
    config = run.config
    scorer, overrides = None, {}
    if config.scored:
        scored = _scored_stages().scored_run(
            config, checked, preprocessor, (run.trainer, run.report_dataset), run.quiet, clock.lap
        )
        fields, recipe_result, scorer, overrides = (
            scored.fields,
            scored.recipe_result,
            scored.scorer,
            scored.overrides,
        )
        mixture = recipe_result.mixture
    else:  # no data: a data-free recipe (uniform is a plain merge)
        recipe, recipe_result = data_free_stage(config, checked, run.quiet)
        mixture = recipe_result.mixture
        fields = {
            "recipe": recipe_info(recipe),
            "candidates": unscored_rows(checked, mixture),
            "details": recipe_result.details,
        }
    if mixture.base is None:
        mixture = replace(mixture, base=checked.base)
    warnings = [*fields.pop("warnings", []), *checked.diagnostics.warnings()]
    summary = SoupSummary(
        base=config.base,
        command=run.command,
        config=config.to_dict(),
        compatibility=checked.compatibility.to_dict(),
        excluded=checked.excluded,
        dtype=str(checked.dtype).removeprefix("torch."),  # the soup is written and scored in it
        mixture=mixture,
        warnings=warnings,
        diagnostics=checked.diagnostics.to_dict(),
        cache=_cache_record(checked, scorer),
        processes=process_state().num_processes,  # evaluation was sharded across this many processes
        **fields,
    )
    return summary, recipe_result, overrides


def _cache_record(checked: Checked, scorer) -> dict[str, Any]:
    return {
        "hits": checked.cache.hits,
        "misses": checked.cache.misses,
        "evaluations": scorer.evaluations if scorer else 0,
        "examples_forwarded": scorer.examples_forwarded if scorer else 0,
        "early_stops": scorer.early_stops if scorer else 0,
        "forward_passes": scorer.log if scorer else [],
    }


__all__ = ["SoupResult", "check", "check_with_diagnostics", "cook"]
