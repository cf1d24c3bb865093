"""`hf_soup.sweep`: a shared linear-probe head (equal to scikit-learn's fit on the frozen features, computed here
independently), variants drawn from the documented grid, the selection carve-out never trained on, and pots that
`cook` soups directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_main
from sklearn.linear_model import LogisticRegression
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from hf_soup.data import carve_selection, load_data
from hf_soup.integrations import INGREDIENT_FILE
from hf_soup.sweep import SweepGrid, sample_variants, sweep


@pytest.fixture(scope="module")
def pot(tmp_path_factory, zoo, reviews):
    folder = tmp_path_factory.mktemp("pot")
    return sweep(zoo["base"], str(reviews["train"]), text_column="review", label_column="score", output=folder,
                 variants=2, selection_fraction=0.2, seed=3, max_length=32, train_rows=64, quiet=True)  # fmt: skip


def test_the_shared_head_is_a_linear_probe_on_frozen_features(pot, zoo, reviews):
    rest, selection = carve_selection(load_data(str(reviews["train"]), split="train"), 0.2, seed=3)
    rows = rest.shuffle(seed=3).select(range(64))
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    body = AutoModel.from_pretrained(zoo["base"]).eval()  # the base's own pooler: the head's input
    with torch.no_grad():
        encoded = tokenizer(
            list(rows["review"]), truncation=True, max_length=32, padding=True, return_tensors="pt"
        )
        features = body(**encoded).pooler_output.double().numpy()
    labels = np.asarray([["great", "other"].index(s) for s in rows["score"]])
    probe = LogisticRegression(C=1.0, max_iter=2000).fit(features, labels)
    head = AutoModelForSequenceClassification.from_pretrained(pot / "start").classifier
    z = features @ probe.coef_[0] + probe.intercept_[0]
    logits = head(torch.as_tensor(features, dtype=torch.float32)).double().detach().numpy()
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], z, atol=1e-4)
    assert not set(rows["review"]) & set(selection["review"])  # the selection rows are never trained on


def test_variants_follow_the_grid_and_record_how_they_were_trained(pot):
    grid = SweepGrid()
    planned = sample_variants(2, grid, seed=3)
    for variant in planned:
        record = json.loads((pot / "runs" / variant.name / INGREDIENT_FILE).read_text())
        assert record["sweep"]["variant"]["learning_rate"] == variant.learning_rate
        assert grid.learning_rate[0] <= variant.learning_rate <= grid.learning_rate[1]
        assert variant.weight_decay in grid.weight_decay and variant.epochs in grid.epochs
        assert record["sweep"]["head"] == "probe" and record["sweep"]["trained_on_rows"] == 64
        assert record["hyperparameters"]["learning_rate"] == variant.learning_rate
    assert sample_variants(2, grid, seed=3) == planned and sample_variants(2, grid, seed=4) != planned


def test_a_sweep_soups_directly(pot, reviews, tmp_path):
    result = run_main("--base", str(pot / "start"), "--candidates", str(pot / "runs" / "*"), "--dataset",
                      str(reviews["train"]), "--report-split", str(reviews["test"]), "--text-column", "review",
                      "--label-column", "score", "--selection-fraction", "0.2", "--seed", "3", "--max-length", "32",
                      "--recipe", "uniform", "--format", "json", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["candidates"]) == 2 and report["compatibility"]["rejected"] == []


def test_sweep_cli_refuses_a_missing_dataset(tmp_path, zoo):
    result = run_main("sweep", "--base", str(zoo["base"]), "--output", str(tmp_path / "pot"), "--quiet")
    assert result.returncode != 0 and "needs --dataset" in result.stderr and not (tmp_path / "pot").exists()
