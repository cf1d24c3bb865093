"""WiSE-FT endpoints and sweep; the logit ensemble and ECE against independent computations."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import config_for
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_soup import cook
from hf_soup.errors import ConfigError
from hf_soup.recipes import parse_alphas
from hf_soup.scoring.ensemble import expected_calibration_error

LABELS = ["great", "other"]


def config(zoo, reviews, tmp_path, name, **overrides):
    """The pipeline tests' configuration, selecting by loss, with one shared score cache."""
    defaults = {
        "selection_metric": "loss",
        "output": str(tmp_path / name),
        "cache_dir": str(tmp_path / "cache"),
    }
    return config_for(zoo, reviews, tmp_path, **{**defaults, **overrides})


@pytest.fixture(scope="module")
def runs(zoo, reviews, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wise")
    return {
        "uniform": cook(config(zoo, reviews, tmp, "uniform", recipe="uniform"), quiet=True),
        "wise0": cook(
            config(zoo, reviews, tmp, "wise0", recipe="wise", alpha="0", wise_of="uniform"), quiet=True
        ),
        "wise1": cook(
            config(zoo, reviews, tmp, "wise1", recipe="wise", alpha="1", wise_of="uniform"), quiet=True
        ),
        "sweep": cook(config(zoo, reviews, tmp, "sweep", recipe="wise", alpha="0:1:0.25"), quiet=True),
    }


def weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.output / "model.safetensors"))


def test_wise_alpha_one_is_exactly_the_soup(runs):
    soup, wise = weights(runs["uniform"]), weights(runs["wise1"])
    assert soup.keys() == wise.keys()
    for name in soup:
        assert torch.equal(soup[name], wise[name]), name


def test_wise_alpha_zero_is_exactly_the_base_under_the_soups_head(runs, zoo):
    base = load_file(str(zoo["base"] / "model.safetensors"))
    soup, wise = weights(runs["uniform"]), weights(runs["wise0"])
    heads = [n for n in wise if n.removeprefix("bert.") not in base]
    assert sorted(heads) == ["classifier.bias", "classifier.weight"]
    for name, tensor in wise.items():
        expected = soup[name] if name in heads else base[name.removeprefix("bert.")]
        assert torch.equal(tensor, expected), name
    manifest = json.loads((runs["wise0"].output / "soup.json").read_text())
    assert manifest["mixture"]["base"]["weight"] == 1.0
    assert "head" in manifest["wise"]


def test_wise_sweep_keeps_the_best_alpha_on_selection_and_plots_the_curve(runs):
    report = runs["sweep"].report
    curve = report["wise"]["curve"]
    assert [p["alpha"] for p in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    best = max(curve, key=lambda p: (-p["selection_loss"], p["alpha"]))
    assert report["wise"]["alpha"] == best["alpha"] == pytest.approx(1 - report["mixture"]["base"]["weight"])
    assert report["soup"]["selection_loss"] == pytest.approx(best["selection_loss"])
    assert all(split in p["report"] for p in curve for split in report["soup"]["report"])
    assert (runs["sweep"].output / "plots" / "wise.png").stat().st_size > 0


@pytest.mark.parametrize("spec", ["2", "1:0:0.1", "0:1:-0.1", "a:b"])
def test_bad_alpha_is_refused(spec):
    with pytest.raises(ConfigError, match="--alpha"):
        parse_alphas(spec)


def manual_logits(folder, texts, tokenizer) -> np.ndarray:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            batch = tokenizer(
                texts[start : start + 32], truncation=True, max_length=64, padding=True, return_tensors="pt"
            )
            out.append(model(**batch).logits.numpy())
    return np.concatenate(out)


def naive_ece(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE written plainly, example by example, from its definition."""
    total = 0.0
    members: dict[int, list[tuple[float, bool]]] = {}
    for row, label in zip(logits.astype(np.float64), labels):
        probabilities = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        confidence = float(probabilities.max())
        index = max(0, min(bins - 1, int(np.ceil(confidence * bins)) - 1))
        members.setdefault(index, []).append((confidence, int(probabilities.argmax()) == label))
    for items in members.values():
        accuracy = sum(c for _, c in items) / len(items)
        confidence = sum(p for p, _ in items) / len(items)
        total += len(items) * abs(accuracy - confidence)
    return total / len(labels)


def test_ensemble_and_ece_match_a_manual_computation(runs, zoo, reviews):
    report = runs["uniform"].report
    test = pd.read_csv(reviews["test"])
    texts, labels = test["review"].tolist(), np.array([LABELS.index(s) for s in test["score"]])
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    logits = {c["id"]: manual_logits(c["id"], texts, tokenizer) for c in report["candidates"]}
    split = next(iter(report["soup"]["report"]))
    mean = np.mean(list(logits.values()), axis=0)
    (ensemble,) = report["ensembles"]  # uniform: the soup's ingredients are all the candidates
    assert ensemble["forward_passes"] == 4
    assert ensemble["report"][split]["accuracy"] == pytest.approx(float((mean.argmax(1) == labels).mean()))
    assert ensemble["ece"][split] == pytest.approx(naive_ece(mean, labels), abs=1e-5)
    best = report["best_individual"]
    assert best["ece"][split] == pytest.approx(naive_ece(logits[best["name"]], labels), abs=1e-5)
    assert report["comparisons"][split]["ensemble"]["accuracy"]["delta"] == pytest.approx(
        ensemble["report"][split]["accuracy"] - best["report"][split]["accuracy"]
    )


def test_ensemble_reuses_the_logits_of_scoring(runs):
    """No forward pass is spent on ensembles: the report split sees the 4 candidates and the soup, once each."""
    report = runs["uniform"].report
    split = next(iter(report["soup"]["report"]))
    passes = [p for p in report["cache"]["forward_passes"] if p["split"] == split]
    assert report["ensembles"] and len(passes) == 4 + 1


def test_ece_of_known_cases():
    labels = np.array([0, 1, 0, 1])
    certain_and_right = np.array([[50.0, 0], [0, 50.0], [50.0, 0], [0, 50.0]])
    assert expected_calibration_error(certain_and_right, labels) == pytest.approx(0.0, abs=1e-12)
    certain_and_wrong = certain_and_right[:, ::-1].copy()
    assert expected_calibration_error(certain_and_wrong, labels) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    random_logits = rng.normal(size=(500, 3)) * 2
    random_labels = rng.integers(0, 3, 500)
    assert expected_calibration_error(random_logits, random_labels) == pytest.approx(
        naive_ece(random_logits, random_labels), abs=1e-9
    )


def test_wise_recipe_keeps_the_best_alpha_not_the_last():
    from hf_soup.mixture import Ingredient, Mixture
    from hf_soup.recipes import UniformSoup, WiseSoup

    recipe = WiseSoup(
        UniformSoup(), [0.0, 0.25, 0.5, 0.75, 1.0], Ingredient("base", 0.0), ["classifier.weight"]
    )
    peak = lambda mixture, bar: -abs(WiseSoup.alpha_of(mixture) - 0.5)  # noqa: E731
    result = recipe.cook(["a", "b"], {"a": 1.0, "b": 0.5}, peak)
    assert WiseSoup.alpha_of(result.mixture) == 0.5
    assert result.mixture.base.weight == 0.5 and result.mixture.weights() == {"a": 0.25, "b": 0.25}
    assert result.mixture.per_tensor_weights == {"classifier.weight": {"a": 0.5, "b": 0.5}}
    assert [point.fields["alpha"] for point in result.curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert result.details["alpha"] == 0.5 and result.details["endpoint"] == "uniform"
    assert isinstance(result.mixture, Mixture)
