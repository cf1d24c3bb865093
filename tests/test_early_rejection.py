"""Exact early rejection: stopping a hopeless trial never changes the accept/reject decision."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_soup.scoring import RejectionBound


def decide(metric: str, outcomes: np.ndarray, must_reach: float, batch: int) -> tuple[bool, int]:
    """(accepted, examples forwarded), stopping as soon as the bound says the trial is hopeless."""
    bound = RejectionBound(metric, len(outcomes), must_reach)
    for start in range(0, len(outcomes), batch):
        if bound.update(outcomes[start : start + batch]):
            return False, start + batch
    return full_decision(metric, outcomes, must_reach), len(outcomes)


def full_decision(metric: str, outcomes: np.ndarray, must_reach: float) -> bool:
    value = float(np.mean(outcomes)) if metric == "accuracy" else -float(np.mean(outcomes))
    return value >= must_reach


@settings(max_examples=400, deadline=None)
@given(
    n=st.integers(1, 300),
    p_trial=st.floats(0, 1),
    p_bar=st.floats(0, 1),
    batch=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_accuracy_early_rejection_is_exact(n, p_trial, p_bar, batch, seed):
    rng = np.random.default_rng(seed)
    outcomes = (rng.random(n) < p_trial).astype(np.float64)
    must_reach = float(np.mean(rng.random(n) < p_bar))  # the score of another soup on the same split
    accepted, forwarded = decide("accuracy", outcomes, must_reach, batch)
    assert accepted == full_decision("accuracy", outcomes, must_reach)
    assert forwarded <= n + batch


@settings(max_examples=400, deadline=None)
@given(
    n=st.integers(1, 300),
    scale=st.floats(0.01, 3),
    bar_scale=st.floats(0.01, 3),
    batch=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
)
def test_loss_early_rejection_is_exact(n, scale, bar_scale, batch, seed):
    rng = np.random.default_rng(seed)
    losses = rng.exponential(scale, n)
    must_reach = -float(np.mean(rng.exponential(bar_scale, n)))
    accepted, _ = decide("loss", losses, must_reach, batch)
    assert accepted == full_decision("loss", losses, must_reach)


def test_equal_scores_are_never_stopped():
    outcomes = np.array([1.0, 0.0, 1.0, 1.0])
    assert decide("accuracy", outcomes, 0.75, 1) == (True, 4)
    assert decide("loss", np.array([0.25, 0.75]), -0.5, 1)[0]


def test_clearly_worse_trials_forward_fewer_examples():
    worse = np.zeros(1000)
    accepted, forwarded = decide("accuracy", worse, 0.9, 50)
    assert not accepted and forwarded == 150  # 100 wrong out of 1000 already rules out 0.9
    accepted, forwarded = decide("loss", np.full(1000, 2.0), -0.5, 50)
    assert not accepted and forwarded <= 300
