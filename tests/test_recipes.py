"""Recipes follow their algorithms exactly, on a scripted objective."""

from __future__ import annotations

import pytest

from hf_soup.errors import ConfigError
from hf_soup.mixture import Mixture
from hf_soup.recipes import GreedySoup, PrunedSoup, UniformSoup, rank, recipe_class


def scripted(table: dict[frozenset, float], calls: list):
    def objective(mixture: Mixture, must_reach: float | None = None) -> float:
        members = frozenset(mixture.ids())
        calls.append(members)
        return table[members]

    return objective


def test_greedy_follows_recipe_1():
    individual = {"a": 0.80, "b": 0.85, "c": 0.70, "d": 0.75}
    table = {
        frozenset("ba"): 0.86,  # accepted: 0.86 >= 0.85
        frozenset("bad"): 0.86,  # accepted on a tie (>=)
        frozenset("badc"): 0.85,  # rejected: drops
    }
    calls = []
    result = GreedySoup().cook(list(individual), individual, scripted(table, calls))
    assert calls == [frozenset("ba"), frozenset("bad"), frozenset("badc")]  # sorted by individual score
    assert result.mixture.ids() == ["b", "a", "d"]
    assert result.mixture.weights() == pytest.approx({"b": 1 / 3, "a": 1 / 3, "d": 1 / 3})
    assert [s.accepted for s in result.trajectory] == [True, True, True, False]


def test_greedy_never_below_best_single():
    individual = {"a": 0.9, "b": 0.5, "c": 0.4}
    table = {frozenset("ab"): 0.6, frozenset("ac"): 0.89}
    result = GreedySoup().cook(list(individual), individual, scripted(table, []))
    assert result.mixture.ids() == ["a"]


def test_greedy_ties_are_broken_by_id():
    individual = {"z": 0.8, "y": 0.8, "x": 0.8}
    table = {frozenset("xy"): 0.7, frozenset("xz"): 0.7}
    result = GreedySoup().cook(list(individual), individual, scripted(table, []))
    assert result.trajectory[0].candidate == "x"


def test_pruned_removes_while_not_worse():
    individual = {"a": 0.9, "b": 0.8, "c": 0.7}
    table = {
        frozenset("abc"): 0.80,
        frozenset("ab"): 0.82,  # removing c (worst first) helps: accepted
        frozenset("a"): 0.81,  # removing b hurts: rejected
        frozenset("b"): 0.70,  # removing a hurts: rejected
    }
    calls = []
    result = PrunedSoup(passes=3).cook(list(individual), individual, scripted(table, calls))
    assert result.mixture.ids() == ["a", "b"]
    # Pass 1 tries c, b, a; pass 2 tries b and a again and removes nothing, so it stops.
    assert calls == [
        frozenset("abc"),
        frozenset("ab"),
        frozenset("a"),
        frozenset("b"),
        frozenset("a"),
        frozenset("b"),
    ]


def test_pruned_single_pass_limit():
    individual = {"a": 0.9, "b": 0.8, "c": 0.7}
    table = {frozenset("abc"): 0.8, frozenset("ab"): 0.8, frozenset("a"): 0.8}
    result = PrunedSoup(passes=1).cook(list(individual), individual, scripted(table, []))
    assert result.mixture.ids() == ["a"]  # ties are accepted (>=), down to one ingredient


def test_uniform_weights_all_equally():
    result = UniformSoup().cook(["a", "b", "c", "d"], {}, lambda m, bar=None: 0.0)
    assert result.mixture.weights() == {k: 0.25 for k in "abcd"}


def test_unknown_recipe_is_a_clear_error():
    with pytest.raises(ConfigError, match="Unknown recipe 'stew': choose one of uniform, greedy, pruned"):
        recipe_class("stew")


def test_mixture_round_trips_and_cache_key_ignores_order():
    m1 = Mixture.uniform("greedy", ["a", "b"])
    m2 = Mixture.uniform("uniform", ["b", "a"])
    assert Mixture.from_dict(m1.to_dict()) == m1
    fingerprints = {"a": "1", "b": "2"}
    assert m1.content_key(fingerprints) == m2.content_key(fingerprints)
    assert m1.content_key(fingerprints) != Mixture.uniform("x", ["a"]).content_key(fingerprints)


def test_greedy_by_loss_accepts_when_loss_does_not_rise():
    """Scorers hand recipes negated losses, so Recipe 1's `>=` is `<=` on loss."""
    losses = {"a": 0.40, "b": 0.35, "c": 0.50}
    table = {frozenset("ba"): -0.35, frozenset("bac"): -0.36}  # equal loss: kept; higher loss: rejected
    result = GreedySoup().cook(list(losses), {k: -v for k, v in losses.items()}, scripted(table, []))
    assert result.mixture.ids() == ["b", "a"]
    assert [s.accepted for s in result.trajectory] == [True, True, False]


def test_ties_are_broken_by_loss_then_id():
    scores = {"x": 0.9, "y": 0.9, "z": 0.9}
    losses = {"x": 0.5, "y": 0.3, "z": 0.3}
    assert rank(list(scores), scores, losses) == ["y", "z", "x"]
    result = GreedySoup().cook(list(scores), scores, lambda m, bar=None: 0.0, tie_break=losses)
    assert result.trajectory[0].candidate == "y"


def test_an_early_stopped_trial_is_rejected():
    individual = {"a": 0.9, "b": 0.8}
    result = GreedySoup().cook(list(individual), individual, lambda m, bar=None: None)
    assert result.mixture.ids() == ["a"]
    assert result.trajectory[1].stopped_early and not result.trajectory[1].accepted
