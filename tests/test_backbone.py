"""Backbone soups (`--soup backbone`): candidates fine-tuned on different tasks, with different label sets, souped
in their shared body only; the target task's head is a linear probe (or one candidate's head).

The candidates are tiny BERTs fine-tuned from the zoo's base on real fine-food reviews, each on another task
derived from the reviews (2, 3 and 4 labels, none of them the target's): whether a review shouts ("!"), its length
tercile, its topic. The target is the reviews' own score (great / other), held out from every fine-tune. The
probe is checked against scikit-learn fitted here on features computed here, and the body against a float64
mean of the candidates' tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fine_tune, run_main, tiny_config
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

TASKS = {
    "shouts": (["calm", "shouting"], lambda text: int("!" in text)),
    "length": (["short", "medium", "long"], lambda text: min(2, len(text) // 250)),
    "topic": (
        ["coffee", "tea", "pet", "other"],
        lambda text: next(
            (
                i
                for i, words in enumerate((("coffee",), ("tea",), ("dog", "cat")))
                if any(w in text.lower() for w in words)
            ),
            3,
        ),
    ),
}


@pytest.fixture(scope="module")
def tasks(zoo, reviews, tokenizer_dir) -> dict[str, Path]:
    """One fine-tune per task, each from the zoo's base with a seeded head of its own label count."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = pd.read_csv(reviews["train"])["review"].tolist()
    paths = {}
    for seed, (name, (labels, label_of)) in enumerate(TASKS.items()):
        torch.manual_seed(10 + seed)
        config = tiny_config(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
        )
        model = BertForSequenceClassification(config)
        model.bert.load_state_dict(load_file(str(zoo["base"] / "model.safetensors")))
        fine_tune(model, tokenizer, texts, [label_of(t) for t in texts], 2e-3, seed, steps=30)
        paths[name] = zoo["root"] / "tasks" / name
        model.save_pretrained(paths[name])
    return paths


def cook_backbone(zoo, tasks, reviews, out: Path, *extra: str):
    return run_main(
        "--base",
        str(zoo["base"]),
        "--candidates",
        *(str(p) for p in tasks.values()),
        "--soup",
        "backbone",
        "--dataset",
        str(reviews["train"]),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--report-split",
        str(reviews["test"]),
        "--max-length",
        "64",
        "--output",
        str(out),
        "--bootstrap",
        "100",
        *extra,
    )


def body_names(state: dict) -> list[str]:
    return [name for name in state if not name.startswith("classifier.")]


def test_uniform_backbone_soup_of_three_label_sets(zoo, tasks, reviews, tokenizer_dir, tmp_path):
    out = tmp_path / "soup"
    result = cook_backbone(zoo, tasks, reviews, out, "--recipe", "uniform")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "soup.json").read_text())
    # Head-less selection: each candidate's head is left out, the body is the float64 mean of the bodies.
    assert summary["compatibility"]["left_out"] == {
        cid: ["classifier.bias", "classifier.weight"] for cid in summary["compatibility"]["accepted"]
    }
    written = load_file(str(out / "model.safetensors"))
    states = [load_file(str(path / "model.safetensors")) for path in tasks.values()]
    for name in body_names(states[0]):
        expected = torch.stack([s[name].double() for s in states]).mean(0)
        assert torch.allclose(written[name].double(), expected, atol=1e-6), name
    # The head: a probe for the target's labels, not any candidate's head.
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "great", "1": "other"} and written["classifier.weight"].shape == (
        2,
        32,
    )
    model = AutoModelForSequenceClassification.from_pretrained(out)  # a plain transformers classifier
    assert model.config.num_labels == 2
    # The probe equals scikit-learn's, fitted here on features computed here (the pooled output, the head's input).
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    weight, bias, cross_fitted = independent_probe(model, tokenizer, reviews, summary)
    np.testing.assert_allclose(written["classifier.weight"].numpy(), weight, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(written["classifier.bias"].numpy(), bias, rtol=1e-3, atol=1e-4)
    # Selection scores are cross-fitted: each half scored by a probe fitted on the other.
    assert summary["soup"]["selection_loss"] == pytest.approx(cross_fitted, rel=1e-3)
    # Baselines in the table: the base with a probe; the card says what was souped.
    assert summary["base_with_head"]["name"] == "base + probe"
    assert "base" in summary["comparisons"]["test.csv"]
    assert "BACKBONE SOUP" in result.stdout
    card = ModelCard.load(out / "README.md")
    assert "backbone soup" in card.text and "shouting" in card.text and "LogisticRegression" in card.text
    reproduced = run_main("reproduce", str(out), "--quiet")
    assert reproduced.returncode == 0, reproduced.stderr


def independent_probe(model, tokenizer, reviews, summary) -> tuple[np.ndarray, np.ndarray, float]:
    """LogisticRegression(C=1) on the soup body's pooled outputs of the selection rows (the same seeded carve-out
    of train.csv that hf-soup selects on), labels as the soup's ids; and the cross-entropy of out-of-fold logits
    over two seeded stratified halves."""
    from hf_soup.evaluation.data import carve_selection, load_data

    data = load_data(str(reviews["train"]), split="train")
    _, selection = carve_selection(data, 0.1, seed=0)
    assert len(selection) == summary["splits"]["selection"]["size"]
    with torch.no_grad():
        encoded = tokenizer(
            list(selection["review"]), truncation=True, max_length=64, padding=True, return_tensors="pt"
        )
        features = model.bert(**encoded).pooler_output.double().numpy()
    labels = np.asarray([["great", "other"].index(s) for s in list(selection["score"])])
    probe = LogisticRegression(C=1.0, max_iter=2000).fit(features, labels)
    z, b = probe.coef_[0], probe.intercept_[0]
    folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=0)
    out_of_fold = cross_val_predict(
        LogisticRegression(C=1.0, max_iter=2000), features, labels, cv=folds, method="decision_function"
    )
    # Cross-entropy of the out-of-fold logits [-z/2, z/2]: log(1 + exp(-z)) for label 1, log(1 + exp(z)) for 0.
    loss = np.mean(np.logaddexp(0, np.where(labels == 1, -out_of_fold, out_of_fold)))
    return np.stack([-z / 2, z / 2]), np.asarray([-b / 2, b / 2]), float(loss)


def test_greedy_backbone_soup_never_below_the_best_single_with_a_probe(zoo, tasks, reviews, tmp_path):
    out = tmp_path / "greedy"
    result = cook_backbone(zoo, tasks, reviews, out, "--recipe", "greedy", "--selection-metric", "loss")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "soup.json").read_text())
    best = summary["best_individual"]["selection_loss"]
    assert summary["soup"]["selection_loss"] <= best + 1e-9
    # Greedy went through the candidates in order of their own probed selection loss.
    losses = {row["id"]: row["selection_loss"] for row in summary["candidates"]}
    tried = [step["candidate"] for step in summary["trajectory"] if step.get("candidate")]
    assert tried == sorted(losses, key=losses.get)[: len(tried)]


def test_candidate_head_is_kept(zoo, tasks, reviews, tmp_path):
    target = zoo["a"]  # fine-tuned on the target task (great / other)
    out = tmp_path / "kept"
    result = run_main(
        "--base",
        str(zoo["base"]),
        "--candidates",
        *(str(p) for p in tasks.values()),
        str(target),
        "--soup",
        "backbone",
        "--head",
        str(target),
        "--dataset",
        str(reviews["train"]),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--report-split",
        str(reviews["test"]),
        "--recipe",
        "uniform",
        "--output",
        str(out),
        "--bootstrap",
        "50",
    )
    assert result.returncode == 0, result.stderr
    written, head = load_file(str(out / "model.safetensors")), load_file(str(target / "model.safetensors"))
    assert torch.equal(written["classifier.weight"], head["classifier.weight"])
    name = json.loads((out / "soup.json").read_text())["base_with_head"]["name"]
    assert name.startswith("base + head of ") and name.endswith("runs/a")


def test_different_bodies_are_rejected_with_nothing_written(zoo, tasks, reviews, tmp_path):
    wider = tmp_path / "wider"
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config(intermediate_size=48)).save_pretrained(wider)
    out = tmp_path / "soup"
    result = run_main(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(tasks["shouts"]),
        str(tasks["length"]),
        str(wider),
        "--soup",
        "backbone",
        "--dataset",
        str(reviews["train"]),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--output",
        str(out),
        "--strict",
    )
    assert result.returncode == 2
    assert result.stderr.count("hf-soup: error:") == 1
    assert f"{wider}: its body differs from" in result.stderr and "intermediate.dense" in result.stderr
    assert not out.exists()


def test_check_compares_bodies_only_for_backbone_soups(zoo, tasks):
    result = run_main(
        "check",
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(tasks["shouts"]),
        str(tasks["length"]),
        str(tasks["topic"]),
        "--format",
        "json",
    )
    rejected = json.loads(result.stdout)["rejected"]
    assert len(rejected) == 2 and all("labels, expected" in r["reason"] for r in rejected)
    backbone = run_main(
        "check",
        "--base",
        str(zoo["base"]),
        "--candidates",
        *(str(p) for p in tasks.values()),
        "--soup",
        "backbone",
        "--format",
        "json",
    )
    report = json.loads(backbone.stdout)
    assert backbone.returncode == 0 and not report["rejected"] and len(report["accepted"]) == 3
    assert report["ingredient_labels"][str(tasks["topic"])] == ["coffee", "tea", "pet", "other"]
