"""`hf_soup.training.sweep`: a shared linear-probe head (equal to scikit-learn's fit on the frozen features, computed here
independently), variants drawn from the documented grid, the selection carve-out never trained on, and pots that
`cook` soups directly."""

from __future__ import annotations

import json

import fashion_mnist as fm  # scripts/fashion_mnist.py (conftest puts scripts/ on sys.path)
import numpy as np
import pytest
import torch
from conftest import run_main
from sklearn.linear_model import LogisticRegression
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    default_data_collator,
)

from hf_soup.evaluation.data import carve_selection, load_data
from hf_soup.training.integrations import INGREDIENT_FILE
from hf_soup.training.sweep import SweepGrid, augmenting, sample_variants, sweep


@pytest.fixture(scope="module")
def pot(tmp_path_factory, zoo, reviews):
    folder = tmp_path_factory.mktemp("pot")
    return sweep(
        zoo["base"],
        str(reviews["train"]),
        text_column="review",
        label_column="score",
        output=folder,
        variants=2,
        selection_fraction=0.2,
        seed=3,
        max_length=32,
        train_rows=64,
        quiet=True,
    )


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
    result = run_main(
        "--base",
        str(pot / "start"),
        "--candidates",
        str(pot / "runs" / "*"),
        "--dataset",
        str(reviews["train"]),
        "--report-split",
        str(reviews["test"]),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--selection-fraction",
        "0.2",
        "--seed",
        "3",
        "--max-length",
        "32",
        "--recipe",
        "uniform",
        "--format",
        "json",
        "--quiet",
        "--output",
        str(tmp_path / "soup"),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert len(report["candidates"]) == 2 and report["compatibility"]["rejected"] == []
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "### How the candidates were trained" in card and "linear-probe head" in card
    for variant in sample_variants(2, SweepGrid(), seed=3):  # each row says how that candidate was trained
        assert (
            f"{variant.name}` | {variant.learning_rate:g} | {variant.epochs} | {variant.weight_decay} |"
            in card
        )


def test_sweep_cli_refuses_a_missing_dataset(tmp_path, zoo):
    result = run_main("sweep", "--base", str(zoo["base"]), "--output", str(tmp_path / "pot"), "--quiet")
    assert result.returncode != 0 and "needs --dataset" in result.stderr and not (tmp_path / "pot").exists()


@pytest.fixture(scope="module")
def image_pot(tmp_path_factory):
    """`hf-soup sweep --task image-classification`: 2 variants of a small pretrained ResNet on Fashion-MNIST."""
    root = tmp_path_factory.mktemp("image_pot")
    data = fm.write_dataset(root / "data", 400, 50)
    base = fm.pretrain(root / "base", rows=400, quiet=True)
    result = run_main(
        "sweep",
        "--base",
        str(base),
        "--dataset",
        str(data),
        "--task",
        "image-classification",
        "--output",
        str(root / "pot"),
        "--variants",
        "2",
        "--selection-fraction",
        "0.25",
        "--seed",
        "5",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    assert "--task image-classification" in result.stdout  # the soup command it suggests
    return {"data": data, "base": base, "pot": root / "pot"}


def test_an_image_sweep_starts_from_a_probe_on_the_base_features(image_pot):
    rest, _selection = carve_selection(load_data(str(image_pot["data"]), split="train"), 0.25, seed=5)
    pixels = fm.image_processor()(list(rest["image"]), return_tensors="pt")["pixel_values"]
    body = AutoModel.from_pretrained(image_pot["base"]).eval()
    with torch.no_grad():
        features = body(pixel_values=pixels).pooler_output.flatten(1).double().numpy()
    probe = LogisticRegression(C=1.0, max_iter=2000).fit(features, np.asarray(rest["label"]))
    start = AutoModelForImageClassification.from_pretrained(image_pot["pot"] / "start").eval()
    with torch.no_grad():
        logits = start(pixel_values=pixels).logits.double().numpy()
    np.testing.assert_allclose(logits, probe.decision_function(features), atol=1e-3)
    for variant in sample_variants(2, SweepGrid.for_images(), seed=5):
        record = json.loads((image_pot["pot"] / "runs" / variant.name / INGREDIENT_FILE).read_text())
        assert record["sweep"]["variant"]["augment"] == variant.augment
        assert record["sweep"]["trained_on_rows"] == len(rest) == 300  # the carve-out is held out


def test_augmentation_is_a_seeded_flip_and_shift_with_replicated_edges():
    images = torch.arange(4 * 1 * 6 * 5, dtype=torch.float32).reshape(4, 1, 6, 5)
    features = [{"pixel_values": image, "labels": 0} for image in images]
    torch.manual_seed(7)
    augmented = augmenting(default_data_collator)(features)["pixel_values"].numpy()
    torch.manual_seed(7)  # the same draws, applied here with numpy
    flip = (torch.rand(4) < 0.5).numpy()
    dy, dx = torch.randint(0, 5, (2,)).tolist()
    expected = np.where(flip[:, None, None, None], images.numpy()[..., ::-1], images.numpy())
    expected = np.pad(expected, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")[..., dy : dy + 6, dx : dx + 5]
    np.testing.assert_array_equal(augmented, expected)
    assert not np.array_equal(augmented, images.numpy())  # seed 7 flips or shifts something
