"""`--recipe auto`: every contender is built on one half of the selection split and judged on the other (both
ways); the best is rebuilt on the whole split, and the best individual is a contender, so a soup that only
looked good on the data it was chosen on loses to it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_golden import build_fixtures

from hf_soup import cook
from hf_soup.evaluation.splits import EncodedSplit
from hf_soup.mixture import Ingredient, Mixture
from hf_soup.recipes import Fold, GreedySoup, RecipeContext, RecipeResult, SoupRecipe, UniformSoup
from hf_soup.recipes.auto import BEST_INDIVIDUAL, DENSITY_GRID, LAMBDA_GRID, AutoSoup, method_contenders

SCORES = {"a": 0.9, "b": 0.8, "c": 0.1}


def objective_from(table: dict[frozenset, float]):
    return lambda mixture, _bar: table[frozenset(mixture.ids())]


def fold(name: str, table: dict[frozenset, float]) -> Fold:
    singles = {cid: table[frozenset([cid])] for cid in SCORES}
    return Fold(name, singles, objective_from(table))


# Soups of a and b help on every part of the selection split; c hurts.
HELPFUL = {
    frozenset("a"): 0.9,
    frozenset("b"): 0.8,
    frozenset("c"): 0.1,
    frozenset("ab"): 0.95,
    frozenset("ac"): 0.6,
    frozenset("abc"): 0.5,
}


def test_auto_picks_the_recipe_that_confirms_and_rebuilds_it_on_the_whole_split():
    recipe = AutoSoup(
        {"uniform": UniformSoup(), "greedy": GreedySoup()}, [fold("A", HELPFUL), fold("B", HELPFUL)]
    )
    result = recipe.cook(list(SCORES), SCORES, objective_from(HELPFUL))
    contenders = result.details["contenders"]
    # Computed by hand: uniform is {a,b,c} (0.5 on both halves); greedy builds {a,b} (0.95); one model, 0.9.
    assert contenders["uniform"]["folds"] == [0.5, 0.5]
    assert contenders["greedy"]["folds"] == [0.95, 0.95]
    assert contenders[BEST_INDIVIDUAL]["folds"] == [0.9, 0.9]
    assert result.details["chosen"] == "greedy" and sorted(result.mixture.ids()) == ["a", "b"]


def test_a_soup_that_only_wins_where_it_was_chosen_loses_to_the_best_individual():
    # On half A, a+b looks best and c is the runner-up; on half B it is the other way round. Greedy built on
    # either half adds the model that the other half punishes.
    half_a = {**HELPFUL, frozenset("ab"): 0.95, frozenset("ac"): 0.2}
    half_b = {
        **HELPFUL,
        frozenset("b"): 0.2,
        frozenset("c"): 0.8,
        frozenset("ab"): 0.3,
        frozenset("ac"): 0.95,
    }
    recipe = AutoSoup({"greedy": GreedySoup()}, [fold("A", half_a), fold("B", half_b)])
    result = recipe.cook(list(SCORES), SCORES, objective_from(HELPFUL))
    contenders = result.details["contenders"]
    assert contenders["greedy"]["folds"] == [0.3, 0.2]  # {a,b} built on A scored on B; {a,c} built on B on A
    assert contenders[BEST_INDIVIDUAL]["folds"] == [0.9, 0.9]
    assert result.details["chosen"] == BEST_INDIVIDUAL and result.mixture.ids() == ["a"]


def test_ties_go_to_the_earlier_contender():
    flat = dict.fromkeys(HELPFUL, 0.5)
    recipe = AutoSoup({"uniform": UniformSoup(), "greedy": GreedySoup()}, [fold("A", flat), fold("B", flat)])
    assert recipe.cook(list(SCORES), SCORES, objective_from(flat)).details["chosen"] == "uniform"


def by_method(scores: dict[tuple, float]):
    """An objective that knows a mixture by its method and that method's parameter (others score 0.5)."""

    def objective(mixture, _bar):
        method = mixture.method or {}
        key = (
            method.get("name"),
            method.get("lambda"),
            tuple(sorted(set((method.get("density") or {}).values()))),
        )
        return scores.get(key, 0.5)

    return objective


def test_mergekit_methods_are_contenders_over_the_stated_grids():
    """Built so the answer is known: task arithmetic at λ = 1.5 scores 0.99 on both halves, DARE-TIES at density
    0.5 scores 0.9, everything else 0.5 or less; auto chooses the first and rebuilds it with that λ."""
    context = RecipeContext(Ingredient("base", 0.0), candidate_order=list(SCORES))
    contenders = method_contenders(context, seed=3)
    assert list(contenders) == [
        *(f"task_arithmetic λ={lam:g}" for lam in LAMBDA_GRID),
        *(f"ties density={d:g}" for d in DENSITY_GRID),
        *(f"dare_ties density={d:g}" for d in DENSITY_GRID),
    ]
    objective = by_method({("task_arithmetic", 1.5, ()): 0.99, ("dare_ties", 1.0, (0.5,)): 0.9})
    folds = [Fold(name, dict.fromkeys(SCORES, 0.4), objective) for name in "AB"]
    recipe = AutoSoup({"uniform": UniformSoup(), **contenders}, folds)
    result = recipe.cook(list(SCORES), SCORES, objective)
    assert result.details["chosen"] == "task_arithmetic λ=1.5" and result.details["tried"] == 1 + 9 + 1
    assert result.mixture.method == {"name": "task_arithmetic", "lambda": 1.5, "normalize": True}
    assert result.details["contenders"]["dare_ties density=0.5"]["folds"] == [0.9, 0.9]
    dare = contenders["dare_ties density=0.5"].cook(list(SCORES), SCORES, objective).mixture.method
    assert dare["seed"] == 3 and dare["normalize"] is True


class Fixed(SoupRecipe):
    """Always the same mixture: stands for a recipe whose result depends on the data it was built for."""

    def __init__(self, ids: str):
        self.ids = list(ids)

    @classmethod
    def name(cls) -> str:
        return "fixed"

    @classmethod
    def pretty_name(cls) -> str:
        return "Fixed soup"

    def cook(self, candidates, individual_scores, objective, revisions=None, tie_break=None) -> RecipeResult:
        return RecipeResult(Mixture.uniform("fixed", self.ids))


def test_a_contender_trained_on_data_is_built_on_each_half_alone_then_on_the_whole_split():
    # The learned soup, say: built on half A alone it makes {a, b}, on half B alone {a}, on the whole split
    # {a, b, c}. Each half's build is judged on the other half; the winner is rebuilt on the whole split.
    half_a = dataclasses.replace(fold("A", HELPFUL), build=lambda name: Fixed("ab"))
    half_b = dataclasses.replace(fold("B", HELPFUL), build=lambda name: Fixed("a"))
    recipe = AutoSoup({"learned": Fixed("abc")}, [half_a, half_b])
    result = recipe.cook(list(SCORES), SCORES, objective_from(HELPFUL))
    assert result.details["contenders"]["learned"]["folds"] == [0.95, 0.9]  # {a,b} judged on B, {a} on A
    assert result.details["chosen"] == "learned" and sorted(result.mixture.ids()) == ["a", "b", "c"]


def test_a_half_of_a_split_keeps_its_examples_longest_first():
    lengths = [3, 9, 1, 7, 5, 8]
    split = EncodedSplit(
        "selection",
        [{"input_ids": [0] * n} for n in lengths],
        np.arange(6) % 2,
        np.argsort(lengths)[::-1],
        "fp",
    )
    half = split.subset(np.array([0, 2, 3, 5]), "selection (A)")
    assert [len(f["input_ids"]) for f in half.features] == [3, 1, 7, 8]
    assert half.labels.tolist() == [0, 0, 1, 1]
    assert [len(half.features[i]["input_ids"]) for i in half.order] == [8, 7, 3, 1]
    assert half.fingerprint != split.fingerprint and len(half) == 4


def test_auto_end_to_end(tmp_path, tokenizer_dir):
    build_fixtures(tmp_path, tokenizer_dir)
    result = cook(
        base=str(tmp_path / "base"),
        candidates=[str(tmp_path / "runs" / "*")],
        dataset=str(tmp_path / "select.csv"),
        selection_split=str(tmp_path / "select.csv"),
        report_split=str(tmp_path / "test.csv"),
        text_column="review",
        label_column="score",
        recipe="auto",
        alpha="0:1:0.5",
        auto_learned=True,
        learn_epochs=1,
        output=str(tmp_path / "soup"),
        quiet=True,
    )
    details = json.loads((tmp_path / "soup" / "soup.json").read_text())["auto"]
    assert set(details["contenders"]) == {
        "uniform",
        "greedy",
        "pruned",
        "stock",
        "wise",
        "learned",
        *(f"task_arithmetic λ={lam:g}" for lam in LAMBDA_GRID),
        *(f"{method} density={d:g}" for method in ("ties", "dare_ties") for d in DENSITY_GRID),
        BEST_INDIVIDUAL,
    }
    assert details["tried"] == 6 + 9 + 1
    best = max(details["contenders"].values(), key=lambda c: c["confirmation"])["confirmation"]
    assert details["contenders"][details["chosen"]]["confirmation"] == pytest.approx(best)
    # Selection loss: shown as a loss, objectives hold it negated.
    for contender in details["contenders"].values():
        assert contender["shown"] == pytest.approx(-contender["confirmation"]) and contender["shown"] > 0
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "### Auto: the recipe chosen on held-out halves" in card and "(chosen)" in card
    assert "of the 16 contenders tried" in card
    assert result.summary.comparisons["test.csv"]["soup"]["accuracy"].delta == pytest.approx(
        result.summary.soup.report["test.csv"]["accuracy"]
        - result.summary.best_individual.report["test.csv"]["accuracy"]
    )
