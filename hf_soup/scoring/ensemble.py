"""The paper's baseline and its calibration measure: the logit ensemble, and expected calibration error.

A logit ensemble averages the logits of N models, so it costs N forward passes per input where a soup costs one.
Every logit used here was already computed while scoring candidates: an ensemble never runs a model again.
A causal-LM ensemble averages the members' next-token probabilities instead (`language_modeling.py`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..evaluation.language_modeling import ensemble_token_nll
from ..evaluation.splits import EncodedSplit
from .scorer import SplitScore

ECE_BINS = 15


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error with `bins` equal-width confidence bins (Guo et al. 2017).

    The confidence of an example is its largest softmax probability; ECE is the example-weighted mean, over bins,
    of |accuracy − mean confidence|. A bin holds confidences in (lower, upper]; the first also holds 0.
    """
    probabilities = torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float64)), dim=1).numpy()
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    total = 0.0
    for index in range(bins):
        members = which == index
        if members.any():
            total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / len(labels))


def ensemble_logits(members: list[SplitScore], causal_lm: bool = False) -> np.ndarray:
    """The logit ensemble's logits: the plain mean of the members' (averaged in float64). For causal LMs, the
    per-token NLL of the mean of the members' probabilities."""
    if any(member.logits is None for member in members):
        raise ValueError("ensemble members must carry logits (score them with this version of hf-soup)")
    if causal_lm:
        return ensemble_token_nll([member.logits for member in members])
    return np.mean(np.stack([member.logits for member in members]), axis=0, dtype=np.float64).astype(
        np.float32
    )


def calibration(score: SplitScore, split: EncodedSplit, classification: bool) -> float | None:
    """ECE (15 bins) of a score's logits on `split`; `None` unless the task is a classification (regression,
    causal LMs), where it is not defined."""
    if not classification or score.logits is None:
        return None
    return expected_calibration_error(score.logits, split.labels)
