"""The tasks `--task` names, and what each evaluates (`TaskSpec`). Kept apart from `data.py`, so that reading
options never imports `datasets`; `check_task_options` is the one place the task and column options are checked."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ConfigError

# The data files hf-soup reads, by suffix, and the `datasets` builder that reads each.
DATA_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

IMAGE_TASK = "image-classification"
CAUSAL_LM_TASK = "causal-lm"
TOP5 = "top5_accuracy"


def is_image_task(task: str | None) -> bool:
    """Whether `--task` names image classification: the one place this is decided."""
    return bool(task) and task.lower() == IMAGE_TASK


def is_causal_lm_task(task: str | None) -> bool:
    """Whether `--task` names causal language modeling (scored by held-out token NLL)."""
    return bool(task) and task.lower() == CAUSAL_LM_TASK


@dataclass(frozen=True)
class TaskSpec:
    """What to evaluate: which columns, which metrics, which splits to report on.

    Args:
        name (`str`): `glue/<task>`, `custom` (text), `image-classification` or `causal-lm`.
        text_column (`str`): the first text column (empty for images).
        label_column (`str`): the label column.
        text_pair_column (`str`, *optional*): the second text column, for sentence pairs.
        metrics (`tuple[str, ...]`): metric names; the first one drives selection.
        regression (`bool`): a single-output regression task (STS-B).
        report_splits (`tuple[str, ...]`): default report splits of the dataset.
        dataset (`str`, *optional*): where the data comes from (a Hub id, file or folder).
        dataset_config (`str`, *optional*): the dataset's config name (the GLUE task).
        image_column (`str`, *optional*): the image column, for image classification.
        positive_label (`str`, *optional*): the label that F1 treats as positive (custom binary tasks).
    """

    name: str
    text_column: str
    label_column: str = "label"
    text_pair_column: str | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    regression: bool = False
    report_splits: tuple[str, ...] = ()
    dataset: str | None = None
    dataset_config: str | None = None
    image_column: str | None = None
    positive_label: str | None = None

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def is_image(self) -> bool:
        return self.image_column is not None

    @property
    def causal_lm(self) -> bool:
        """Causal language modeling: documents scored by token NLL (`language_modeling.py`), no labels."""
        return self.name == CAUSAL_LM_TASK

    def with_top5(self, num_labels: int) -> TaskSpec:
        """Image classification reports top-5 accuracy too, when there are more than 5 classes."""
        if self.is_image and num_labels > 5 and TOP5 not in self.metrics:
            return replace(self, metrics=(*self.metrics, TOP5))
        return self


def _glue(task, text, pair=None, metrics=("accuracy",), regression=False, report=("validation",)) -> TaskSpec:
    return TaskSpec(
        name=f"glue/{task}",
        text_column=text,
        text_pair_column=pair,
        metrics=metrics,
        regression=regression,
        report_splits=report,
        dataset="nyu-mll/glue",
        dataset_config=task,
    )


GLUE: dict[str, TaskSpec] = {
    "cola": _glue("cola", "sentence", metrics=("matthews_correlation",)),
    "sst2": _glue("sst2", "sentence"),
    "mrpc": _glue("mrpc", "sentence1", "sentence2", metrics=("accuracy", "f1")),
    "qqp": _glue("qqp", "question1", "question2", metrics=("accuracy", "f1")),
    "stsb": _glue("stsb", "sentence1", "sentence2", metrics=("pearson", "spearmanr"), regression=True),
    "mnli": _glue("mnli", "premise", "hypothesis", report=("validation_matched", "validation_mismatched")),
    "qnli": _glue("qnli", "question", "sentence"),
    "rte": _glue("rte", "sentence1", "sentence2"),
    "wnli": _glue("wnli", "sentence1", "sentence2"),
}


def task_spec(
    task: str | None = None,
    dataset: str | None = None,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    regression: bool = False,
    image_column: str | None = None,
) -> TaskSpec:
    """Build the `TaskSpec` for `--task glue/<name>`, `--task image-classification`, or `--dataset` with columns.

    `--task glue/sst2 --dataset ./copy` evaluates a local copy of GLUE data with GLUE's columns and metrics.
    """
    check_task_options(task, dataset, text_column, label_column)
    if is_image_task(task):
        return TaskSpec(
            IMAGE_TASK, "", label_column or "label", dataset=dataset, image_column=image_column or "image"
        )
    if is_causal_lm_task(task):
        return TaskSpec(CAUSAL_LM_TASK, text_column, "", metrics=("perplexity", "nll"), dataset=dataset)
    if task:
        spec = GLUE[task.lower().removeprefix("glue/")]
        overrides = {
            "text_column": text_column,
            "text_pair_column": text_pair_column,
            "label_column": label_column,
        }
        spec = replace(spec, **{k: v for k, v in overrides.items() if v})
        return replace(spec, dataset=dataset, dataset_config=None) if dataset else spec
    metrics = ("pearson", "spearmanr") if regression else ("accuracy",)
    return TaskSpec(
        "custom", text_column, label_column, text_pair_column, metrics, regression=regression, dataset=dataset
    )


GLUE_TASKS = tuple(GLUE)


def check_task_options(
    task: str | None, dataset: str | None, text_column: str | None, label_column: str | None
) -> None:
    """Refuse a task and data options that do not go together (no data is read).

    Raises:
        ConfigError: an unknown task, or a task without the data or columns it needs.
    """
    if task and not (
        is_image_task(task) or is_causal_lm_task(task) or task.lower().removeprefix("glue/") in GLUE
    ):
        raise ConfigError(
            f"Unknown task {task!r}: choose {IMAGE_TASK}, {CAUSAL_LM_TASK} or one of glue/{', glue/'.join(GLUE)}."
        )
    if is_causal_lm_task(task) and not (dataset and text_column):
        raise ConfigError(
            f"--task {CAUSAL_LM_TASK} needs --dataset (a text file or Hub dataset id) and --text-column (the "
            "documents to score)."
        )
    if is_image_task(task) and not dataset:
        raise ConfigError(
            f"--task {IMAGE_TASK} needs --dataset: an imagefolder, a folder of parquet files, or a Hub dataset id "
            "(with --image-column / --label-column if not 'image' / 'label')."
        )
    if not task and not dataset:
        raise ConfigError("Give --task glue/<name>, or --dataset with --text-column and --label-column.")
    if dataset and not task and not (text_column and label_column):
        raise ConfigError(
            "--dataset needs --text-column and --label-column (and --text-pair-column for pairs)."
        )


def check_selection_fraction(fraction: float) -> None:
    """Refuse a `--selection-fraction` outside (0, 1)."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--selection-fraction must be between 0 and 1, got {fraction}.")
