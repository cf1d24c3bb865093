"""Evaluation data: dataset loading and the selection / report split policy (tasks are defined in `tasks.py`).

Selection (greedy order, acceptance) and the numbers we claim must come from different data. By default:
select on a seeded carve-out of `train`, report on `validation` for GLUE (both MNLI validation sets), or on the
dataset's `test`/`validation` split or a file given with `--report-split`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, load_dataset

from ..errors import DatasetError
from .tasks import DATA_BUILDERS, TaskSpec, check_selection_fraction

logger = logging.getLogger(__name__)

# A class holding less than this share of a uniform split (1/K each) is rare: 20% of the examples for binary labels.
RARE_SHARE_OF_UNIFORM = 0.4


@dataclass(frozen=True)
class LabelBalance:
    """How a custom classification task is scored, decided from the selection split's labels.

    Args:
        spec (`TaskSpec`): the task with the metrics that fit its labels (the headline metric first) and, for
            binary labels, the name of the positive one.
        pos_label (`int`): the model label id F1 treats as positive (binary labels).
        warning (`str`, *optional*): set when a class is rare, so that accuracy misleads.
    """

    spec: TaskSpec
    pos_label: int = 1
    warning: str | None = None


def fit_metrics_to_labels(
    spec: TaskSpec,
    labels: np.ndarray,
    num_labels: int,
    label_names: list[str] | None,
    positive_label: str | None = None,
    extra_metrics: tuple[str, ...] = (),
) -> LabelBalance:
    """The metrics of a custom classification task: accuracy plus F1 of the positive class (binary labels) or
    macro-F1 (more classes), and any `extra_metrics` (e.g. `matthews_correlation`).

    The positive class is `positive_label` (a label name or id), by default the selection split's rarest class.
    When a class holds less than 20% of a binary selection split (less than 0.4/K of a K-class one), accuracy
    misleads, so F1 becomes the headline metric and the returned warning says so. GLUE and regression tasks keep
    their own metrics.
    """
    if spec.name != "custom" or spec.regression:
        return LabelBalance(spec)
    names = label_names or [str(i) for i in range(num_labels)]
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_labels)[:num_labels]
    if positive_label is None:
        pos_label = int(
            max(range(num_labels), key=lambda i: (-counts[i], i))
        )  # rarest; ties: the later label
    elif positive_label in names:
        pos_label = names.index(positive_label)
    else:
        raise DatasetError(
            f"--positive-label {positive_label!r} is not one of the labels ({', '.join(names)}); name one of them."
        )
    f1 = "f1" if num_labels == 2 else "macro_f1"
    shares = counts / max(1, counts.sum())
    rare = int(np.argmin(shares))
    imbalanced = bool(shares[rare] < RARE_SHARE_OF_UNIFORM / num_labels)
    metrics = (f1, "accuracy") if imbalanced else ("accuracy", f1)
    metrics = (*metrics, *(m for m in extra_metrics if m not in metrics))
    warning = None
    if imbalanced:
        warning = (
            f"Label {names[rare]!r} is {shares[rare]:.1%} of the selection split: accuracy misleads on "
            f"imbalanced labels (always predicting the majority scores {shares.max():.1%}), so the headline "
            f"compares {f1 if num_labels == 2 else 'macro-F1'}"
            + (f" of the positive label {names[pos_label]!r}." if num_labels == 2 else ".")
        )
    positive_name = names[pos_label] if num_labels == 2 else None
    return LabelBalance(replace(spec, metrics=metrics, positive_label=positive_name), pos_label, warning)


def load_data(source: str, config: str | None = None, split: str | None = None):
    path = Path(source)
    try:
        if path.is_file():
            builder = DATA_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DatasetError(f"{source}: unsupported file type; use CSV, JSON(L) or parquet.")
            kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            return load_dataset(builder, data_files={"train": str(path)}, split=split, **kwargs)
        if by_split := _files_by_split(path):
            builder, files = by_split
            return load_dataset(builder, data_files=files, split=split)
        return load_dataset(source, config, split=split)
    except DatasetError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        raise DatasetError(
            f"Could not load dataset {source}{'/' + config if config else ''}"
            f"{' split ' + split if split else ''}: {str(error).splitlines()[0]}. Offline, Hub datasets must "
            "already be in the datasets cache; otherwise pass a local file or folder with --dataset."
        ) from error


def _files_by_split(folder: Path) -> tuple[str, dict[str, str]] | None:
    """A folder of data files named after their splits (`train.csv`, `validation_matched.csv`, ...): each file is
    the split its name says. `datasets` would fold `validation_matched` and `validation_mismatched` into one
    `validation` split, losing MNLI's two report splits."""
    if not folder.is_dir():
        return None
    metadata = {"dataset_dict", "dataset_info", "state"}  # `save_to_disk` bookkeeping, not data
    files = {
        f.stem: f
        for f in folder.iterdir()
        if f.is_file() and f.suffix.lower() in DATA_BUILDERS and f.stem not in metadata
    }
    builders = {DATA_BUILDERS[f.suffix.lower()] for f in files.values()}
    if "train" not in files or len(builders) != 1 or any(f.suffix.lower() == ".tsv" for f in files.values()):
        return None
    return builders.pop(), {stem: str(f) for stem, f in files.items()}


@dataclass
class SplitPlan:
    """The selection split, the report split(s), and how they were made."""

    selection: Dataset
    reports: dict[str, Dataset]
    selection_name: str
    same_split: bool = False
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def carve_selection(train: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Split `train` into `(rest, selection)`: a seeded carve-out of `fraction` of the rows.

    Fine-tune on `rest` so that the selection split is truly held out, as the paper did with ImageNet.

    Example:
    ```python
    >>> rest, selection = carve_selection(train, 0.1, seed=0)
    ```
    """
    check_selection_fraction(fraction)
    size = max(1, round(len(train) * fraction))
    if size >= len(train):
        raise DatasetError(f"The train split has {len(train)} rows: too few to carve a selection split from.")
    parts = train.train_test_split(test_size=size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _resolve_split(spec: TaskSpec, loaded: DatasetDict | None, split: str) -> Dataset:
    if Path(split).is_file():
        return load_data(split, split="train")
    if loaded is not None and split in loaded:
        return loaded[split]
    return load_data(spec.dataset, spec.dataset_config, split=split)


def plan_splits(
    spec: TaskSpec,
    selection_split: str | None = None,
    report_split: str | None = None,
    selection_fraction: float = 0.1,
    seed: int = 0,
    max_eval_examples: int | None = None,
) -> SplitPlan:
    """Load the data and apply the split policy (see the module docstring).

    A small selection split is allowed (GLUE WNLI has 635 training rows); when it cannot tell the candidates apart,
    the report warns (`stats.small_split_warning`).
    """
    loaded = load_data(spec.dataset, spec.dataset_config)
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    notes: list[str] = []
    reports = _report_splits(spec, loaded, report_split)
    if selection_split:
        selection_name = Path(selection_split).name if Path(selection_split).is_file() else selection_split
        selection = _resolve_split(spec, loaded, selection_split)
    elif "train" in loaded:
        rest, selection = carve_selection(loaded["train"], selection_fraction, seed)
        selection_name = f"train carve-out ({selection_fraction:g}, seed {seed})"
        if not reports:
            # A single-file dataset: carve the report split from the rest of it, disjoint from selection.
            _, report = carve_selection(
                rest, min(0.5, selection_fraction / (1 - selection_fraction)), seed + 1
            )
            reports = {f"train carve-out #2 (seed {seed + 1})": report}
            notes.append(
                "The report split was carved from the same file as the selection split (disjoint rows). "
                "Pass --report-split with held-out test data for numbers you can claim."
            )
    else:
        raise DatasetError(
            f"{spec.dataset} has no train split to carve a selection split from; pass --selection-split."
        )
    if not reports:
        raise DatasetError(
            f"{spec.dataset} has no test or validation split to report on; pass --report-split."
        )
    same = selection_split is not None and selection_split in (report_split, *reports)
    if same:
        notes.append(
            f"SELECTION AND REPORT USE THE SAME SPLIT ({selection_split}): reported scores are optimistic, "
            "because the soup was chosen on them."
        )
    if max_eval_examples:
        selection = _subsample(selection, max_eval_examples, seed)
        reports = {name: _subsample(data, max_eval_examples, seed) for name, data in reports.items()}
    _refuse_empty({"selection": selection, **reports})
    return SplitPlan(selection, reports, selection_name, same, notes)


def _report_splits(spec: TaskSpec, loaded: DatasetDict, report_split: str | None) -> dict[str, Dataset]:
    """`--report-split` (a split name or a file), else the task's report splits, else test / validation."""
    if report_split:
        name = Path(report_split).name if Path(report_split).is_file() else report_split
        return {name: _resolve_split(spec, loaded, report_split)}
    names = [s for s in spec.report_splits if s in loaded] or [
        s for s in ("test", "validation") if s in loaded
    ]
    return {name: loaded[name] for name in names}


def _refuse_empty(splits: dict[str, Dataset]) -> None:
    for name, data in splits.items():
        if len(data) == 0:
            raise DatasetError(
                f"The {name} split is empty; choose another split or a larger --selection-fraction."
            )


def _subsample(data: Dataset, limit: int, seed: int) -> Dataset:
    return data if len(data) <= limit else data.shuffle(seed=seed).select(range(limit))


def check_columns(spec: TaskSpec, data: Dataset, split_name: str) -> None:
    """Fail with the available columns when a needed column is missing."""
    inputs = [spec.image_column] if spec.is_image else [spec.text_column, spec.text_pair_column]
    needed = [c for c in (*inputs, spec.label_column) if c]
    missing = [c for c in needed if c not in data.column_names]
    if missing:
        flags = "--image-column" if spec.is_image else "--text-column / --text-pair-column"
        raise DatasetError(
            f"The {split_name} split has no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(data.column_names)}. Set {flags} / --label-column."
        )


def dataset_label_names(data: Dataset, label_column: str) -> list[str] | None:
    """The dataset's label names in id order: ClassLabel names, or the sorted distinct strings."""
    feature = data.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return sorted(set(data[label_column]))
    return None
