"""The whole pipeline on tiny real fine-tunes: scores, output folder, card, cache, split policy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_soup import SoupConfig, cook
from hf_soup.evaluation.data import carve_selection, load_data, plan_splits
from hf_soup.evaluation.tasks import task_spec


def config_for(zoo, reviews, tmp_path, **overrides):
    values = dict(
        base=str(zoo["base"]),
        candidates=[str(zoo["root"] / "runs" / "*")],
        dataset=str(reviews["train"]),
        report_split=str(reviews["test"]),
        text_column="review",
        label_column="score",
        recipe="greedy",
        selection_fraction=0.25,
        max_length=64,
        selection_metric="accuracy",
        output=str(tmp_path / "soup"),
    )
    values.update(overrides)
    return SoupConfig.from_options(**values)


def manual_accuracy(state: dict, model_dir, texts, labels, tokenizer) -> float:
    """Accuracy of `state` computed without hf-soup: plain transformers forward passes and sklearn."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.load_state_dict(state, strict=False)
    model.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            batch = tokenizer(
                texts[start : start + 32], truncation=True, max_length=64, padding=True, return_tensors="pt"
            )
            predictions.extend(model(**batch).logits.argmax(-1).tolist())
    return accuracy_score(labels, predictions)


def average(folders):
    states = [load_file(str(f / "model.safetensors")) for f in folders]
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}


@pytest.fixture(scope="module")
def greedy_run(zoo, reviews, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("greedy")
    import os

    os.environ["HF_SOUP_CACHE"] = str(tmp / "cache")
    config = config_for(zoo, reviews, tmp)
    first = cook(config, quiet=True)
    second = cook(config.__class__(**{**config.to_dict(), "output": str(tmp / "soup2")}), quiet=True)
    return config, first, second


def test_scores_match_an_independent_computation(greedy_run, zoo, reviews):
    _config, result, _ = greedy_run
    report = result.report
    train = load_data(str(reviews["train"]), split="train")
    _, selection = carve_selection(train, 0.25, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    texts = list(selection["review"])
    labels = [["great", "other"].index(s) for s in selection["score"]]
    for candidate in report["candidates"]:
        folder = candidate["id"]
        state = load_file(f"{folder}/model.safetensors")
        expected = manual_accuracy(state, folder, texts, labels, tokenizer)
        assert candidate["selection"]["accuracy"] == pytest.approx(expected)
    # Each greedy trial scored what the recipe says it tried; a trial stopped early really was below the bar.
    kept = [report["candidates"][0]["id"]]
    bar = report["candidates"][0]["selection"]["accuracy"]
    for step in report["trajectory"][1:]:
        trial = [*kept, step["candidate"]]
        expected = manual_accuracy(average([Path(p) for p in trial]), kept[0], texts, labels, tokenizer)
        if step["stopped_early"]:
            assert not step["accepted"] and expected < bar
        else:
            assert step["score"] == pytest.approx(expected, abs=1e-9)
        if step["accepted"]:
            kept, bar = trial, step["score"]
    assert kept == result.mixture.ids()


def test_greedy_never_below_best_individual(greedy_run, zoo, reviews):
    """The best individual is the candidate with the best selection accuracy, recomputed with plain transformers."""
    _, result, _ = greedy_run
    report = result.report
    _, selection = carve_selection(load_data(str(reviews["train"]), split="train"), 0.25, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    labels = [["great", "other"].index(s) for s in selection["score"]]
    accuracy = {
        str(zoo[k]): manual_accuracy(
            load_file(str(zoo[k] / "model.safetensors")), zoo[k], list(selection["review"]), labels, tokenizer
        )
        for k in "abcd"
    }
    assert accuracy[report["best_individual"]["id"]] == max(accuracy.values())
    assert report["soup"]["selection"]["accuracy"] >= max(accuracy.values()) - 1e-12
    assert len(report["uniform"]["ingredients"]) == 4


def test_output_loads_and_predicts_like_the_in_memory_soup(greedy_run, reviews, zoo):
    config, result, _ = greedy_run
    soup = AutoModelForSequenceClassification.from_pretrained(config.output)
    tokenizer = AutoTokenizer.from_pretrained(config.output)
    assert soup.config.id2label == {0: "great", 1: "other"}
    in_memory = AutoModelForSequenceClassification.from_pretrained(result.mixture.ids()[0])
    in_memory.load_state_dict(
        average([__import__("pathlib").Path(p) for p in result.mixture.ids()]), strict=False
    )
    texts = pd.read_csv(reviews["test"])["review"].tolist()[:64]
    batch = tokenizer(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            soup.eval()(**batch).logits, in_memory.eval()(**batch).logits, atol=1e-5, rtol=1e-5
        )
    test = pd.read_csv(reviews["test"])
    expected = manual_accuracy(
        soup.state_dict(),
        config.output,
        test["review"].tolist(),
        [["great", "other"].index(s) for s in test["score"]],
        tokenizer,
    )
    assert result.report["soup"]["report"]["test.csv"]["accuracy"] == pytest.approx(expected)


def test_manifest_card_and_plots(greedy_run):
    config, result, _ = greedy_run
    from pathlib import Path

    folder = Path(config.output)
    manifest = json.loads((folder / "soup.json").read_text())
    # The manifest names local ingredients relative to the soup folder, never by absolute path.
    relative = {
        i.id: os.path.relpath(i.id, folder.absolute())
        for i in (*result.mixture.ingredients, result.mixture.base)
    }
    assert [(i["id"], i["weight"]) for i in manifest["mixture"]["ingredients"]] == [
        (relative[i.id], i.weight) for i in result.mixture.ingredients
    ]
    assert manifest["mixture"]["base"]["id"] == relative[result.mixture.base.id]
    assert all((folder / i["id"]).is_dir() for i in manifest["mixture"]["ingredients"])
    assert manifest["splits"]["same_split"] is False
    assert set(manifest["versions"]) >= {"hf-soup", "torch", "transformers", "safetensors"}
    written = load_file(str(folder / "model.safetensors"))
    from hf_soup.merge.materialize import tensor_sha256

    assert {k: tensor_sha256(v) for k, v in written.items()} == manifest["tensor_sha256"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None  # local ingredients and base: no Hub id to name
    assert all(f"| `{Path(i).name}` |" in card.text for i in result.mixture.ids())  # by folder name
    assert not any(relative[i] in card.text for i in result.mixture.ids())  # paths stay in soup.json
    assert set(card.data.tags) == {"model-soup", "merge", "hf-soup"}
    assert card.data.eval_results[0].metric_type == "accuracy"
    assert card.data.eval_results[0].metric_value == pytest.approx(
        manifest["soup"]["report"]["test.csv"]["accuracy"], abs=1e-6
    )
    assert "2203.05482" in card.text and "greedy soup" in card.text
    # Is the gain real: a paired interval per report metric, and a plain statement in the card.
    comparison = manifest["comparisons"]["test.csv"]["soup"]["accuracy"]
    assert comparison["low"] <= comparison["delta"] <= comparison["high"] and "mcnemar" in comparison
    assert "statistically significant at 95%" in card.text
    for plot in ("plots/trajectory.png", "plots/candidates.png"):
        assert (folder / plot).read_bytes()[:4] == b"\x89PNG"
    assert not list(folder.parent.glob(".soup.tmp-*"))


def test_rerun_hits_the_score_cache_for_every_evaluation(greedy_run):
    _, first, second = greedy_run
    assert first.evaluations > 0
    assert second.evaluations == 0 and second.cache_hits > 0
    assert second.report["soup"] == first.report["soup"]


def test_pruned_and_uniform_recipes(zoo, reviews, tmp_path):
    pruned = cook(config_for(zoo, reviews, tmp_path, recipe="pruned", passes=2, output=None), quiet=True)
    report = pruned.report
    assert report["trajectory"][0]["action"] == "start"
    assert report["trajectory"][0]["score"] == pytest.approx(report["uniform"]["selection"]["accuracy"])
    assert report["soup"]["selection"]["accuracy"] >= report["uniform"]["selection"]["accuracy"]

    merged = cook(
        SoupConfig(
            base=str(zoo["base"]),
            candidates=[str(zoo["a"]), str(zoo["b"])],
            recipe="uniform",
            output=str(tmp_path / "merge"),
        ),
        quiet=True,
    )
    assert merged.report["soup"] is None and (tmp_path / "merge" / "model.safetensors").is_file()
    assert ModelCard.load(tmp_path / "merge" / "README.md").data.base_model is None  # no Hub ids: none listed


def test_split_policy(reviews, tmp_path):
    spec = task_spec(dataset=str(reviews["train"]), text_column="review", label_column="score")
    plan = plan_splits(spec, report_split=str(reviews["test"]), selection_fraction=0.2, seed=3)
    assert len(plan.selection) == 80 and list(plan.reports) == ["test.csv"] and not plan.same_split
    # A single file and no report split: two disjoint carve-outs, with a note.
    plan = plan_splits(spec, selection_fraction=0.2)
    report = next(iter(plan.reports.values()))
    assert not set(plan.selection["review"]) & set(report["review"])
    assert plan.notes
    same = plan_splits(spec, selection_split=str(reviews["test"]), report_split=str(reviews["test"]))
    assert same.same_split and "SAME SPLIT" in same.notes[0]


# GLUE's columns, label counts and validation splits as the `nyu-mll/glue` dataset card lists them, and the metric
# of each task as the GLUE paper (Wang et al. 2019, Table 1) defines it: written down independently of hf_soup.
GLUE_CARD = {
    "cola": (("sentence",), 2, ("validation",), {"matthews_correlation"}),
    "sst2": (("sentence",), 2, ("validation",), {"accuracy"}),
    "mrpc": (("sentence1", "sentence2"), 2, ("validation",), {"accuracy", "f1"}),
    "qqp": (("question1", "question2"), 2, ("validation",), {"accuracy", "f1"}),
    "stsb": (("sentence1", "sentence2"), 1, ("validation",), {"pearson", "spearmanr"}),
    "mnli": (("premise", "hypothesis"), 3, ("validation_matched", "validation_mismatched"), {"accuracy"}),
    "qnli": (("question", "sentence"), 2, ("validation",), {"accuracy"}),
    "rte": (("sentence1", "sentence2"), 2, ("validation",), {"accuracy"}),
    "wnli": (("sentence1", "sentence2"), 2, ("validation",), {"accuracy"}),
}


@pytest.mark.parametrize("task", sorted(GLUE_CARD))
def test_glue_tasks_read_the_cards_columns_and_report_on_its_validation_splits(task, tmp_path):
    """A local copy laid out like the Hub dataset (its columns, its split names, an unlabelled test split) is read
    with the task's columns, reported on the card's validation split(s), scored with the paper's metrics."""
    columns, num_labels, validation, metrics = GLUE_CARD[task]
    rng = np.random.default_rng(0)
    for split in ("train", *validation, "test"):
        frame = pd.DataFrame({c: [f"{c} {i}" for i in range(40)] for c in columns})
        frame["label"] = rng.normal(size=40) if num_labels == 1 else rng.integers(0, num_labels, 40)
        if split == "test":
            frame["label"] = -1
        frame.to_csv(tmp_path / f"{split}.csv", index=False)
    spec = task_spec(f"glue/{task}", dataset=str(tmp_path))
    plan = plan_splits(spec, selection_fraction=0.25)
    assert list(plan.reports) == list(validation)  # never the unlabelled test split
    assert (spec.text_column, spec.text_pair_column) == (columns[0], columns[1] if len(columns) > 1 else None)
    assert set(spec.metrics) == metrics and spec.regression == (num_labels == 1)


def test_glue_task_on_a_local_copy(zoo, reviews, tmp_path):
    """`--task glue/sst2 --dataset DIR` reads GLUE-format data offline, with ClassLabel names."""
    import datasets

    def to_sst2(path):
        frame = pd.read_csv(path)
        features = datasets.Features(
            {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["great", "other"])}
        )
        return datasets.Dataset.from_dict(
            {
                "sentence": frame["review"].tolist(),
                "label": [["great", "other"].index(s) for s in frame["score"]],
            },
            features,
        )

    folder = tmp_path / "sst2"
    datasets.DatasetDict(
        {"train": to_sst2(reviews["train"]), "validation": to_sst2(reviews["test"])}
    ).save_to_disk(folder)
    for split in ("train", "validation"):
        datasets.load_from_disk(folder)[split].to_parquet(folder / f"{split}.parquet")
    result = cook(
        SoupConfig(
            base=str(zoo["base"]),
            candidates=[str(zoo["a"]), str(zoo["b"])],
            task="glue/sst2",
            dataset=str(folder),
            recipe="greedy",
            max_length=64,
            batch_size=32,  # the default 10% carve-out of 400 rows is 40 examples: at least one batch of 32
        ),
        quiet=True,
    )
    assert list(result.report["soup"]["report"]) == ["validation"]
    assert result.report["splits"]["selection"]["name"].startswith("train carve-out")


def test_metrics_match_their_textbook_definitions():
    """Each metric against its formula from confusion counts or ranks, not against the library call it wraps."""
    from hf_soup.evaluation.metrics import compute_metrics

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    tp, tn = np.sum((p == 1) & (y == 1)), np.sum((p == 0) & (y == 0))
    fp, fn = np.sum((p == 1) & (y == 0)), np.sum((p == 0) & (y == 1))
    mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    got = compute_metrics(("accuracy", "f1", "matthews_correlation"), p, y)
    assert got == pytest.approx(
        {"accuracy": (tp + tn) / 200, "f1": 2 * tp / (2 * tp + fp + fn), "matthews_correlation": mcc}
    )
    # F1 of the positive label given: label 0 as positive swaps the roles of the counts.
    assert compute_metrics(("f1",), p, y, pos_label=0)["f1"] == pytest.approx(2 * tn / (2 * tn + fn + fp))
    y3, p3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    per_class = [2 * np.sum((p3 == k) & (y3 == k)) / (np.sum(p3 == k) + np.sum(y3 == k)) for k in range(3)]
    assert compute_metrics(("macro_f1",), p3, y3)["macro_f1"] == pytest.approx(np.mean(per_class))
    a, b = rng.normal(size=100), rng.normal(size=100)
    centred_a, centred_b = a - a.mean(), b - b.mean()
    pearson = centred_a @ centred_b / np.sqrt((centred_a @ centred_a) * (centred_b @ centred_b))
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))  # no ties in continuous draws
    spearman = 1 - 6 * np.sum((ranks_a - ranks_b) ** 2) / (100 * (100**2 - 1))
    got = compute_metrics(("pearson", "spearmanr"), a, b)
    assert got == pytest.approx({"pearson": pearson, "spearmanr": spearman}, abs=1e-6)


def test_the_evaluate_module_gives_the_same_metrics():
    """`TaskMetric`, the same metrics as an `evaluate` module, through evaluate's own `compute`."""
    from hf_soup.evaluation.evaluate_metric import TaskMetric
    from hf_soup.evaluation.metrics import compute_metrics

    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 3, 120), rng.integers(0, 3, 120)
    a, b = rng.normal(size=80), rng.normal(size=80)
    scores = rng.normal(size=(120, 7)).astype(np.float32)
    cases = [
        ("accuracy", p, y, {}),
        ("macro_f1", p, y, {}),
        ("matthews_correlation", p, y, {}),
        ("f1", p % 2, y % 2, {"pos_label": 0}),
        ("pearson", a, b, {}),
        ("spearmanr", a, b, {}),
    ]
    for name, predictions, references, kwargs in cases:
        expected = compute_metrics((name,), predictions, references, **kwargs)
        got = TaskMetric(config_name=name).compute(predictions=predictions, references=references, **kwargs)
        assert got == pytest.approx(expected, abs=1e-12), name
    expected = compute_metrics(("top5_accuracy",), None, y, scores=scores)
    assert TaskMetric(config_name="top5_accuracy").compute(predictions=scores, references=y) == expected
    top5 = np.argsort(-scores, axis=1)[:, :5]
    assert expected["top5_accuracy"] == pytest.approx(np.mean([y[i] in top5[i] for i in range(120)]))


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_selection_metric_and_exact_early_rejection(zoo, reviews, tmp_path, metric):
    def run(early: bool, cache: str):
        config = config_for(
            zoo,
            reviews,
            tmp_path,
            selection_metric=metric,
            no_early_rejection=not early,
            output=None,
            cache_dir=str(tmp_path / cache),
        )
        return cook(config, quiet=True).report

    full, early = run(False, "full"), run(True, "early")
    assert early["mixture"] == full["mixture"]  # same decisions, whatever was stopped early
    assert [t["accepted"] for t in early["trajectory"]] == [t["accepted"] for t in full["trajectory"]]
    assert early["cache"]["examples_forwarded"] <= full["cache"]["examples_forwarded"]
    assert full["cache"]["early_stops"] == 0
    key = (lambda c: c["selection_loss"]) if metric == "loss" else (lambda c: -c["selection"]["accuracy"])
    values = [key(c) for c in full["candidates"]]
    assert values == sorted(values)  # ranked by the selection metric
    assert full["task"]["selection_metric"] == metric


def test_selection_metric_f1_on_a_pair_task(zoo, reviews, tmp_path):
    import datasets

    def pairs(path):
        frame = pd.read_csv(path)
        halves = [(r[: len(r) // 2], r[len(r) // 2 :]) for r in frame["review"]]
        features = datasets.Features(
            {
                "sentence1": datasets.Value("string"),
                "sentence2": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["great", "other"]),
            }
        )
        return datasets.Dataset.from_dict(
            {
                "sentence1": [a for a, _ in halves],
                "sentence2": [b for _, b in halves],
                "label": [["great", "other"].index(s) for s in frame["score"]],
            },
            features,
        )

    folder = tmp_path / "mrpc"
    folder.mkdir()
    pairs(reviews["train"]).to_parquet(folder / "train.parquet")
    pairs(reviews["test"]).to_parquet(folder / "validation.parquet")
    config = SoupConfig(
        base=str(zoo["base"]),
        candidates=[str(zoo["root"] / "runs" / "*")],
        task="glue/mrpc",
        dataset=str(folder),
        selection_metric="f1",
        max_length=64,
        batch_size=32,
    )
    report = cook(config, quiet=True).report
    f1s = [c["selection"]["f1"] for c in report["candidates"]]
    assert f1s == sorted(f1s, reverse=True) and set(report["soup"]["report"]["validation"]) == {
        "accuracy",
        "f1",
    }
    with pytest.raises(Exception, match="not computed"):
        cook(SoupConfig(**{**config.to_dict(), "selection_metric": "matthews_correlation"}), quiet=True)
