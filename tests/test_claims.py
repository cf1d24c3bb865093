"""What the headline claims: the paper's best individual, small data, duplicates, flagged candidates, metrics.

Every test here builds a case where the old behaviour would mislead (a best individual picked by loss, a refused
small dataset, a candidate counted twice, a from-scratch model souped in, accuracy on rare labels) and checks the
reported numbers against an independent computation.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LABELS, copy_model, data_dir, installed_script, run_main
from safetensors.torch import load_file, save_file
from sklearn.metrics import accuracy_score, f1_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_soup.reporting.tables import soup_table
from hf_soup.results import SoupSummary

HF_SOUP = installed_script("hf-soup")


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_main(*args)


def with_constant_head(source, target, bias: list[float]):
    """A copy of `source` whose classifier ignores its input: logits = `bias` for every example."""
    folder = copy_model(source, target)
    state = load_file(str(folder / "model.safetensors"))
    state["classifier.weight"] = torch.zeros_like(state["classifier.weight"])
    state["classifier.bias"] = torch.tensor(bias, dtype=state["classifier.bias"].dtype)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def data_args(train, test, *extra: str) -> list[str]:
    return [
        "--dataset",
        str(train),
        "--report-split",
        str(test),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--max-length",
        "64",
        *extra,
    ]


def test_headline_compares_with_the_best_selection_accuracy_not_the_lowest_loss(zoo, reviews, tmp_path):
    # "hedge" predicts the minority label with near-uniform probabilities: the lowest loss of the three and the
    # lowest accuracy. "sure" always predicts the majority with confidence: the highest accuracy, a high loss.
    runs = tmp_path / "runs"
    hedge = with_constant_head(zoo["a"], runs / "hedge", [0.0, 0.1])
    sure = with_constant_head(zoo["b"], runs / "sure", [3.0, 0.0])
    with_constant_head(zoo["c"], runs / "unsure", [0.0, 2.5])
    result = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(runs / "*"),
        *data_args(reviews["train"], reviews["test"]),
        "--recipe",
        "greedy",
        "--format",
        "json",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["task"]["selection_metric"] == "loss"  # the default still drives the recipe
    by_id = {c["id"]: c for c in report["candidates"]}
    losses = {cid: c["selection_loss"] for cid, c in by_id.items()}
    accuracies = {cid: c["selection"]["accuracy"] for cid, c in by_id.items()}
    assert min(losses, key=losses.get) == str(hedge) and min(accuracies, key=accuracies.get) in (
        str(hedge),
        str(runs / "unsure"),
    )
    assert max(accuracies, key=accuracies.get) == str(sure)

    assert report["best_individual"]["id"] == str(sure)
    assert report["best_by_selection_metric"]["id"] == str(hedge)
    # Every comparison is against "sure": the interval's delta is soup accuracy minus sure's, on the report split.
    soup, best = report["soup"]["report"]["test.csv"], by_id[str(sure)]["report"]["test.csv"]
    delta = report["comparisons"]["test.csv"]["soup"]["accuracy"]["delta"]
    assert delta == pytest.approx(soup["accuracy"] - best["accuracy"], abs=1e-12)
    labels = pd.read_csv(reviews["test"])["score"]
    assert best["accuracy"] == pytest.approx(float(np.mean(labels == "great")))  # "sure" always says great

    human = soup_table(SoupSummary.from_dict(report))  # what the CLI prints for this report
    # ... by the runs' folder names
    assert f"vs best individual ({sure.name}, the best selection accuracy) on test.csv" in human
    assert f"best individual ({sure.name})" in human and f"best by loss ({hedge.name}; not compared)" in human


def write_pairs(frame: pd.DataFrame, path, labels) -> None:
    """GLUE's pair format (sentence1, sentence2, label), from real reviews."""
    text = frame["review"].str.split(".", n=1)
    pd.DataFrame(
        {"sentence1": text.str[0], "sentence2": text.str[1].fillna("").str[:200], "label": labels}
    ).to_csv(path, index=False)


def test_small_datasets_run_with_default_options(zoo, tmp_path):
    """WNLI's size (635 train rows, 71 validation rows) and a 500-row CSV: a soup with default options."""
    pool = pd.read_csv(data_dir() / "train.csv").sample(n=1000, random_state=2).reset_index(drop=True)
    wnli = tmp_path / "wnli"
    wnli.mkdir()
    codes = (pool["score"] == "other").astype(int)
    write_pairs(pool.iloc[:635], wnli / "train.csv", codes.iloc[:635])
    write_pairs(pool.iloc[:71], wnli / "validation.csv", codes.iloc[:71])
    write_pairs(pool.iloc[:146], wnli / "test.csv", [-1] * 146)  # GLUE test splits have no labels
    result = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["root"] / "runs" / "*"),
        "--task",
        "glue/wnli",
        "--dataset",
        str(wnli),
        "--output",
        str(tmp_path / "wnli-soup"),
        "--format",
        "json",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["splits"]["selection"]["size"] == round(0.1 * 635)
    assert report["splits"]["report"] == {"validation": {"size": 71}}
    assert (tmp_path / "wnli-soup" / "model.safetensors").is_file()

    small = tmp_path / "small.csv"
    pool.iloc[:500].to_csv(small, index=False)
    result = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["root"] / "runs" / "*"),
        "--dataset",
        str(small),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--output",
        str(tmp_path / "small-soup"),
        "--format",
        "json",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["splits"]["selection"]["size"] == 50  # fewer than one batch of 64: allowed now
    assert (tmp_path / "small-soup" / "model.safetensors").is_file()


def test_an_identical_copy_counts_once(zoo, tmp_path):
    copy = copy_model(
        zoo["a"], tmp_path / "a-copy"
    )  # a copied folder, or a last checkpoint beside its final save
    out = tmp_path / "merged"
    result = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(copy),
        str(zoo["b"]),
        "--recipe",
        "uniform",
        "--output",
        str(out),
        "--format",
        "json",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    [rejected] = report["compatibility"][
        "rejected"
    ]  # one of the pair, whichever comes second in candidate order
    kept = ({str(copy), str(zoo["a"])} - {rejected["id"]}).pop()
    assert rejected["reason"] == f"identical to {kept} (same content): it counts once"
    assert sorted(report["compatibility"]["accepted"]) == sorted([kept, str(zoo["b"])])
    written = load_file(str(out / "model.safetensors"))
    a, b = (load_file(str(zoo[k] / "model.safetensors")) for k in "ab")
    for name, tensor in written.items():
        expected = (a[name].double() + b[name].double()) / 2 if tensor.is_floating_point() else a[name]
        torch.testing.assert_close(tensor.double(), expected.double(), rtol=0, atol=1e-6)


def test_strict_cook_refuses_a_flagged_candidate_before_any_scoring(zoo, scratch, tmp_path):
    # The dataset does not exist: the refusal must come before the data is even loaded.
    result = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        str(scratch),
        "--strict",
        "--dataset",
        str(tmp_path / "missing.csv"),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--output",
        str(tmp_path / "soup"),
    )
    assert result.returncode == 2
    assert result.stderr.count("hf-soup: error:") == 1 and "--strict" in result.stderr
    assert str(scratch) in result.stderr and "do not look fine-tuned" in result.stderr
    assert not (tmp_path / "soup").exists()


def test_a_flagged_candidate_is_scored_but_kept_out_unless_included(zoo, scratch, reviews, tmp_path):
    args = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        str(scratch),
        *data_args(reviews["train"], reviews["test"], "--max-eval-examples", "60"),
        "--recipe",
        "uniform",
        "--format",
        "json",
        "--quiet",
    ]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [i["id"] for i in report["mixture"]["ingredients"]] == [str(zoo["a"]), str(zoo["b"])]
    flagged = {c["id"]: c for c in report["candidates"]}[str(scratch)]
    assert not flagged["kept"] and "kept out of the soup" in flagged["excluded"]
    assert "selection_loss" in flagged  # still scored, still in the table

    included = json.loads(cli(*args, "--include-flagged").stdout)
    assert {i["id"] for i in included["mixture"]["ingredients"]} == {str(zoo[k]) for k in "ab"} | {
        str(scratch)
    }


@pytest.fixture(scope="module")
def rare_positives(reviews, tmp_path_factory):
    """Real reviews where 'other' is about 10% of the rows."""
    folder = tmp_path_factory.mktemp("rare")
    out = {}
    for split in ("train", "test"):
        frame = pd.read_csv(reviews[split])
        great, other = frame[frame.score == "great"], frame[frame.score == "other"]
        rare = pd.concat([great, other.head(max(1, len(great) // 9))]).sample(frac=1.0, random_state=0)
        rare.to_csv(folder / f"{split}.csv", index=False)
        out[split] = folder / f"{split}.csv"
    return out


def test_f1_on_rare_labels_is_sklearns_and_drives_a_greedy_soup(zoo, rare_positives, tmp_path):
    out = tmp_path / "soup"
    result = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["root"] / "runs" / "*"),
        *data_args(rare_positives["train"], rare_positives["test"], "--selection-fraction", "0.3"),
        "--selection-metric",
        "f1",
        "--extra-metrics",
        "matthews_correlation",
        "--recipe",
        "greedy",
        "--output",
        str(out),
        "--format",
        "json",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["task"]["positive_label"] == "other"  # the rarer label, by default
    assert report["task"]["primary_metric"] == "f1"  # accuracy misleads at ~10% positives: the headline is F1
    assert report["task"]["metrics"] == ["f1", "accuracy", "matthews_correlation"]
    assert any("accuracy misleads" in w for w in report["warnings"])

    # The written soup, scored by plain transformers and scikit-learn.
    test = pd.read_csv(rare_positives["test"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        batch = tokenizer(
            list(test["review"]), truncation=True, max_length=64, padding=True, return_tensors="pt"
        )
        predicted = model(**batch).logits.argmax(-1).numpy()
    labels = np.array([LABELS.index(s) for s in test["score"]])
    soup = report["soup"]["report"]["test.csv"]
    assert soup["f1"] == pytest.approx(f1_score(labels, predicted, pos_label=LABELS.index("other")), abs=1e-6)
    assert soup["accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)
    assert "f1" in report["comparisons"]["test.csv"]["soup"]
    # `hf-soup evaluate` on the written folder reports the same metrics, with the same positive label.
    options = data_args(rare_positives["train"], rare_positives["test"], "--selection-fraction", "0.3")
    evaluated = cli(
        "evaluate", str(out), *options, "--extra-metrics", "matthews_correlation", "--format", "json"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["test.csv"]["metrics"] == pytest.approx(
        report["soup"]["report"]["test.csv"]
    )


def test_positive_label_must_be_a_label(zoo, rare_positives, tmp_path):
    out = tmp_path / "soup"
    result = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        *data_args(rare_positives["train"], rare_positives["test"]),
        "--positive-label",
        "terrible",
        "--output",
        str(out),
    )
    assert result.returncode == 2 and result.stderr.count("hf-soup: error:") == 1
    assert "--positive-label 'terrible' is not one of the labels (great, other)" in result.stderr
    assert not out.exists()
