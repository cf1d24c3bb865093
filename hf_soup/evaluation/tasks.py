"""The tasks `--task` names: kept apart from `data.py`, so that reading options never imports `datasets`."""

from __future__ import annotations

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
IMAGE_TASK = "image-classification"
CAUSAL_LM_TASK = "causal-lm"


def is_image_task(task: str | None) -> bool:
    """Whether `--task` names image classification: the one place this is decided."""
    return bool(task) and task.lower() == IMAGE_TASK


def is_causal_lm_task(task: str | None) -> bool:
    """Whether `--task` names causal language modeling (scored by held-out token NLL)."""
    return bool(task) and task.lower() == CAUSAL_LM_TASK
