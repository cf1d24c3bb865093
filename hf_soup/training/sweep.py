"""`hf_soup.training.sweep` / `hf-soup sweep`: fine-tune K variants of one base the way soups need them.

The paper's protocol (Wortsman et al. 2022, §3; its seed experiments):

- **One shared start, with a linear-probe head** (`head="probe"`, the default): the classifier is initialised by
  a logistic regression (scikit-learn's `LogisticRegression`, L2, C=1, lbfgs) fitted on the base's frozen features
  of the training rows (the input of the head's last linear layer), so every variant starts from the same
  sensible head and fine-tuning stays in one basin. `head="random"` is the seeded random head instead.
- **Hyperparameters drawn at random from a documented grid** (`SweepGrid`): learning rate (log-uniform), weight
  decay, epochs, label smoothing, the data order (a seed per variant) and, for images, augmentation (random
  horizontal flips and shifts of up to 2 pixels, `SweepGrid.for_images()`).
- **Text or images**: `text_column` for a text classifier (`AutoModelForSequenceClassification`, the base's
  tokenizer), or `task="image-classification"` with `image_column` (`AutoModelForImageClassification`, the base's
  image processor, applied once; augmentation is applied per batch).
- **The selection carve-out is never trained on**: the same seeded carve-out that `cook` selects on (same
  `selection_fraction` and `seed`).
- Each variant is saved with `SoupCallback` (`hf_soup_ingredient.json`: its hyperparameters) plus the sweep's
  record of the variant and the head.

```python
>>> from hf_soup.training.sweep import sweep
>>> pot = sweep("./minilm", "train.csv", text_column="review", label_column="score", output="./pot", variants=8)
>>> # then: hf-soup --base ./pot/start --candidates "./pot/runs/*" --dataset train.csv ...
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from ..errors import ConfigError, DatasetError
from ..evaluation.data import carve_selection, dataset_label_names, load_data
from ..evaluation.tasks import IMAGE_TASK, is_image_task
from ..progress import progress_bar
from ..scoring.probe import fit_probe, head_layer, set_head
from .integrations import INGREDIENT_FILE, SoupCallback
from .progress import VariantProgress, use_variant_progress

logger = logging.getLogger(__name__)

START = "start"
RUNS = "runs"


@dataclass(frozen=True)
class SweepGrid:
    """The random-search grid: learning rate log-uniform in `learning_rate`, the others uniform over their values."""

    learning_rate: tuple[float, float] = (3e-5, 2e-4)
    weight_decay: tuple[float, ...] = (0.0, 0.01, 0.1)
    epochs: tuple[int, ...] = (1, 2)
    label_smoothing: tuple[float, ...] = (0.0, 0.1)
    augment: tuple[bool, ...] = (False,)

    @classmethod
    def for_images(cls) -> SweepGrid:
        """Image classifiers (a small pretrained CNN, AdamW): higher learning rates, and augmentation on or off."""
        return cls(learning_rate=(1e-3, 5e-3), weight_decay=(0.0, 0.05), augment=(False, True))


@dataclass(frozen=True)
class SweepVariant:
    """One fine-tuning run: its hyperparameters and its data-order seed."""

    name: str
    learning_rate: float
    epochs: float
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    scheduler: str = "linear"
    augment: bool = False  # images: random horizontal flips and shifts of up to 2 pixels, per batch


def sample_variants(count: int, grid: SweepGrid = SweepGrid(), seed: int = 0) -> list[SweepVariant]:
    """`count` variants drawn from `grid` with a seeded generator: the same seed gives the same sweep."""
    rng = random.Random(seed)
    low, high = (math.log(v) for v in grid.learning_rate)
    variants = []
    for index in range(count):
        variants.append(
            SweepVariant(
                name=f"v{index:02d}",
                learning_rate=round(math.exp(rng.uniform(low, high)), 8),
                epochs=rng.choice(grid.epochs),
                weight_decay=rng.choice(grid.weight_decay),
                label_smoothing=rng.choice(grid.label_smoothing),
                seed=rng.randrange(100_000),
                # Drawn only when the grid varies it, so text sweeps keep their seeded draws.
                augment=rng.choice(grid.augment) if len(grid.augment) > 1 else grid.augment[0],
            )
        )
    return variants


@dataclass(frozen=True)
class SweepData:
    """What to train on: the task's columns, and the rows left after the selection carve-out."""

    dataset: str
    text_column: str | None
    label_column: str
    text_pair_column: str | None = None
    selection_fraction: float = 0.1
    seed: int = 0
    max_length: int = 128
    train_rows: int | None = None  # a seeded subsample of the rest, for small budgets
    image_column: str | None = None  # images instead of text

    @property
    def columns(self) -> list[str]:
        return [
            c for c in (self.text_column, self.text_pair_column, self.image_column, self.label_column) if c
        ]


def _check_sweep_options(dataset: str, label_column: str | None, inputs: str | None, head: str) -> None:
    if not (dataset and label_column and inputs):
        raise ConfigError(
            "A sweep needs --dataset and --label-column, and --text-column (text) or --task "
            f"{IMAGE_TASK} (images): the rows to fine-tune on."
        )
    if head not in ("probe", "random"):
        raise ConfigError(
            f"--head must be 'probe' (a linear probe on frozen features) or 'random', got {head!r}."
        )


def sweep(
    base: str | Path,
    dataset: str,
    *,
    output: str | Path,
    label_column: str | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    task: str | None = None,
    image_column: str | None = None,
    variants: int | list[SweepVariant] = 8,
    head: str = "probe",
    grid: SweepGrid | None = None,
    selection_fraction: float = 0.1,
    seed: int = 0,
    max_length: int = 128,
    train_rows: int | None = None,
    batch_size: int | None = None,
    quiet: bool = False,
    verbose: bool = False,
) -> Path:
    """Fine-tune `variants` (a count to sample from `grid`, or a list) of `base` on `dataset` minus the selection
    carve-out, from one shared start; return `output`, which holds `start/` (the base with the shared head: soup
    with `--base output/start`) and `runs/<variant>/`. Resumable: variants already in `runs/` are skipped.

    Text needs `text_column` and `label_column`; images need `task="image-classification"` (`image_column` and
    `label_column` default to "image" and "label"). The grid defaults to `SweepGrid()` for text and
    `SweepGrid.for_images()` for images; the batch size to 16 and 64. Each variant shows one bar with its loss, then
    one line (name, learning rate, epochs, seconds); `verbose` shows Trainer's own bar and logs instead.
    """
    image = is_image_task(task)
    label_column = label_column or ("label" if image else None)
    _check_sweep_options(dataset, label_column, text_column if not image else "images", head)
    grid = grid or (SweepGrid.for_images() if image else SweepGrid())
    data = SweepData(
        dataset,
        None if image else text_column,
        label_column,
        text_pair_column,
        selection_fraction=selection_fraction,
        seed=seed,
        max_length=max_length,
        train_rows=train_rows,
        image_column=(image_column or "image") if image else None,
    )
    plan = variants if isinstance(variants, list) else sample_variants(variants, grid, seed)
    output = Path(output)
    inputs = SweepInputs.of(Path(base), image)
    train, labels = _training_rows(data, inputs)
    batch_size = batch_size or (64 if image else 16)
    start = _shared_start(Path(base), output / START, (train, labels), inputs, head, batch_size)
    for index, variant in enumerate(plan, start=1):
        if (output / RUNS / variant.name / "model.safetensors").is_file():
            continue
        record = {"variant": dataclasses.asdict(variant), "head": head, "grid": dataclasses.asdict(grid)}
        record.update(data=dataclasses.asdict(data), trained_on_rows=len(train))
        label = None if verbose else f"{index}/{len(plan)} {variant.name}"
        run = (train, inputs, batch_size)
        _fine_tune(start, variant, run, output / RUNS, record, quiet=quiet, label=label)
    return output


@dataclass
class SweepInputs:
    """How a sweep reads its inputs: the base's tokenizer or image processor, the model class, the collator."""

    preprocessor: Any
    model_class: type
    collator: Callable
    image: bool

    @classmethod
    def of(cls, base: Path, image: bool) -> SweepInputs:
        if image:
            return cls(
                AutoImageProcessor.from_pretrained(base),
                AutoModelForImageClassification,
                default_data_collator,
                True,
            )
        tokenizer = AutoTokenizer.from_pretrained(base)
        return cls(tokenizer, AutoModelForSequenceClassification, DataCollatorWithPadding(tokenizer), False)

    def encode(self, batch, data: SweepData) -> dict:
        """A batch of rows as model inputs: tokens, or the image processor's pixel values (computed once)."""
        if self.image:
            return dict(self.preprocessor(batch[data.image_column], return_tensors="np"))
        pairs = batch[data.text_pair_column] if data.text_pair_column else None
        return dict(
            self.preprocessor(batch[data.text_column], pairs, truncation=True, max_length=data.max_length)
        )

    def collator_for(self, variant: SweepVariant) -> Callable:
        return augmenting(self.collator) if variant.augment else self.collator


def augmenting(collator: Callable) -> Callable:
    """`collator`, then random horizontal flips and shifts of up to 2 pixels (edges replicated) of each batch, from
    torch's global generator: the Trainer seeds it with the variant's seed, so a variant's augmentation repeats."""

    def collate(features):
        batch = collator(features)
        pixels = batch["pixel_values"]
        flip = torch.rand(len(pixels)) < 0.5
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        height, width = pixels.shape[-2:]
        padded = torch.nn.functional.pad(pixels, (2, 2, 2, 2), mode="replicate")
        dy, dx = torch.randint(0, 5, (2,)).tolist()
        batch["pixel_values"] = padded[..., dy : dy + height, dx : dx + width]
        return batch

    return collate


def _training_rows(data: SweepData, inputs: SweepInputs):
    """The rows to train on (train minus the selection carve-out, as `cook` carves it), encoded, and the label
    names in id order."""
    train = load_data(data.dataset, split="train")
    for column in data.columns:
        if column not in train.column_names:
            raise DatasetError(
                f"{data.dataset} has no column {column!r} (it has {', '.join(train.column_names)})."
            )
    rest, _selection = carve_selection(train, data.selection_fraction, data.seed)
    if data.train_rows is not None and data.train_rows < len(rest):
        rest = rest.shuffle(seed=data.seed).select(range(data.train_rows))
    labels = dataset_label_names(rest, data.label_column)
    if labels is None:
        raise DatasetError(f"The label column {data.label_column!r} holds no class names or ids to train on.")
    index = {name: i for i, name in enumerate(labels)}

    def encode(batch):
        values = batch[data.label_column]
        return {
            **inputs.encode(batch, data),
            "labels": [index[v] if isinstance(v, str) else int(v) for v in values],
        }

    encoded = rest.map(encode, batched=True, remove_columns=rest.column_names)
    if inputs.image:
        encoded.set_format("torch")  # stacked by the default collator, not rebuilt from nested lists
    return encoded, labels


def _shared_start(
    base: Path, folder: Path, training, inputs: SweepInputs, head: str, batch_size: int
) -> Path:
    """The base with one classifier head every variant starts from: a linear probe, or seeded random."""
    if (folder / "config.json").is_file():
        return folder
    train, labels = training
    torch.manual_seed(0)
    model = inputs.model_class.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    if head == "probe":
        probe = fit_linear_probe(model, train, inputs.collator, batch_size)
        logger.info("Linear-probe head: %.4f accuracy on the training rows", probe)
    model.save_pretrained(folder)
    inputs.preprocessor.save_pretrained(folder)
    return folder


@torch.no_grad()
def probe_features(model, train, collator, batch_size: int) -> np.ndarray:
    """The input of the head's last linear layer for every training row, from the frozen model in eval mode."""
    layer = head_layer(model, model.config.num_labels)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0].detach()))
    model.eval()
    try:
        with progress_bar(total=len(train), desc="Linear probe features", unit="row", quiet=True) as bar:
            for start in range(0, len(train), batch_size):
                rows = [train[i] for i in range(start, min(start + batch_size, len(train)))]
                batch = collator([{k: v for k, v in row.items() if k != "labels"} for row in rows])
                model(**batch)
                bar.update(len(rows))
    finally:
        handle.remove()
    return torch.cat(captured).double().numpy()


def fit_linear_probe(model, train, collator, batch_size: int = 16) -> float:
    """Set the head's last layer to a logistic regression on frozen features (`probe.fit_probe`); return its
    training accuracy."""
    features = probe_features(model, train, collator, batch_size)
    targets = np.asarray(train["labels"])
    weight, bias = fit_probe(features, targets, model.config.num_labels)
    set_head(head_layer(model, model.config.num_labels), weight, bias)
    return float(np.mean((features @ weight.T + bias).argmax(axis=1) == targets))


def _fine_tune(
    start: Path,
    variant: SweepVariant,
    training,
    runs: Path,
    record: dict,
    *,
    quiet: bool,
    label: str | None,
):
    """One variant with `transformers.Trainer`; `SoupCallback` saves it into `runs/`, with the sweep's record.
    With a `label`, one bar and one line (`VariantProgress`) replace Trainer's bar and logs (`--verbose` keeps them)."""
    train, inputs, batch_size = training
    console = None if label is None else VariantProgress(label, variant.learning_rate, variant.epochs, quiet)
    model = inputs.model_class.from_pretrained(start)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            run_name=variant.name,
            learning_rate=variant.learning_rate,
            num_train_epochs=variant.epochs,
            weight_decay=variant.weight_decay,
            label_smoothing_factor=variant.label_smoothing,
            lr_scheduler_type=variant.scheduler,
            per_device_train_batch_size=batch_size,
            seed=variant.seed,
            save_strategy="no",
            logging_strategy="no" if console is None else "steps",
            logging_steps=1,  # the console's running loss
            report_to="none",
            disable_tqdm=quiet,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train,
            processing_class=inputs.preprocessor,
            data_collator=inputs.collator_for(variant),
            callbacks=[SoupCallback(runs, base=str(start))],
        )
        if console is not None:
            use_variant_progress(trainer, console)
        # Trainer prints its logs; stdout is for results (and --quiet means quiet).
        with contextlib.redirect_stdout(open(os.devnull, "w") if quiet else sys.stderr):
            trainer.train()
    path = runs / variant.name / INGREDIENT_FILE
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "sweep": record}, indent=2, sort_keys=True) + "\n"
    )


__all__ = [
    "SweepData",
    "SweepGrid",
    "SweepInputs",
    "SweepVariant",
    "augmenting",
    "fit_linear_probe",
    "sample_variants",
    "sweep",
]
