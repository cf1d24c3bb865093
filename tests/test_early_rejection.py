"""Exact early rejection: stopping a hopeless trial never changes the accept/reject decision.

The decisions are compared with the real full evaluation (`score_logits`, whose loss and accuracy the recipes
compare with `>=`), on float32 logits, including bars that tie the trial exactly or sit one float step above it.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_soup.evaluation.splits import EncodedSplit
from hf_soup.evaluation.tasks import TaskSpec
from hf_soup.scoring.scorer import logits_unless_hopeless, score_logits

SPEC = TaskSpec("custom", "text", metrics=("accuracy",))


def split_of(labels: np.ndarray) -> EncodedSplit:
    return EncodedSplit("selection", [], labels, np.arange(len(labels)), "fingerprint")


def batches(logits: np.ndarray, order: np.ndarray, size: int):
    for start in range(0, len(order), size):
        indices = order[start : start + size]
        yield indices, logits[indices]


def full_value(metric: str, logits: np.ndarray, split: EncodedSplit) -> float:
    """The selection value of a full evaluation, as the scorer computes it (higher is better)."""
    score = score_logits(logits, split, SPEC)
    return -score.loss if metric == "loss" else score.metrics["accuracy"]


def trial(draw_seed: int, n: int, classes: int, scale: float) -> tuple[np.ndarray, EncodedSplit, np.ndarray]:
    rng = np.random.default_rng(draw_seed)
    logits = (rng.standard_normal((n, classes)) * scale).astype(np.float32)
    labels = rng.integers(0, classes, n)
    return logits, split_of(labels), rng.permutation(n)


@settings(max_examples=300, deadline=None)
@given(
    metric=st.sampled_from(["loss", "accuracy"]),
    n=st.integers(1, 300),
    classes=st.integers(2, 5),
    scale=st.floats(0.01, 8),
    batch=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
    bar=st.sampled_from(["tie", "just above", "just below", "another trial"]),
)
def test_early_rejection_decides_as_a_full_evaluation(metric, n, classes, scale, batch, seed, bar):
    logits, split, order = trial(seed, n, classes, scale)
    value = full_value(metric, logits, split)
    if bar == "another trial":  # the score of another soup on the same split
        other, _, _ = trial(seed + 1, n, classes, scale)
        must_reach = full_value(metric, other, split)
    else:
        must_reach = {
            "tie": value,
            "just above": np.nextafter(value, np.inf),
            "just below": np.nextafter(value, -np.inf),
        }[bar]
    kept, seen = logits_unless_hopeless(batches(logits, order, batch), split, SPEC, metric, must_reach)
    accepted_in_full = value >= must_reach  # the recipes' rule (Recipe 1's `>=`)
    if kept is None:
        assert not accepted_in_full, "stopped a trial that a full evaluation accepts"
        assert seen < n
    else:
        assert seen == n and np.array_equal(kept, logits)
    if bar == "tie":
        assert kept is not None  # an exact tie is never stopped


def test_clearly_worse_trials_forward_fewer_examples():
    labels = np.zeros(1000, dtype=np.int64)
    wrong = np.tile(np.array([[0.0, 5.0]], dtype=np.float32), (1000, 1))  # always predicts the other label
    kept, seen = logits_unless_hopeless(
        batches(wrong, np.arange(1000), 50), split_of(labels), SPEC, "accuracy", 0.9
    )
    assert kept is None and seen == 150  # 150 wrong out of 1000 already rules out 0.9
    kept, seen = logits_unless_hopeless(
        batches(wrong, np.arange(1000), 50), split_of(labels), SPEC, "loss", -0.5
    )
    assert kept is None and seen == 100  # ~5 nats each: 100 examples exceed the whole budget of 0.5 x 1000
