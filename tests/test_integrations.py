"""`SoupCallback`: a Trainer hyperparameter sweep fills a pot, and the pot soups through the CLI."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from test_compat import Payload
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from hf_soup.cli import main
from hf_soup.training.integrations import INGREDIENT_FILE, SoupCallback

LABELS = ["great", "other"]
# Two CPU processes in one gloo group. (`accelerate launch --cpu` starts a single process unless given an MPI
# hostfile; `--multi_gpu` is accelerate's torchrun launcher, and ACCELERATE_USE_CPU=1 puts it on the CPU.)
# `accelerate launch` of this environment's accelerate, wherever its scripts were installed.
LAUNCH_TWO_CPU_PROCESSES = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


@pytest.fixture(scope="module")
def pot(zoo, reviews, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    frame = pd.read_csv(reviews["train"])
    encoded = tokenizer(frame["review"].tolist(), truncation=True, max_length=48)
    data = Dataset.from_dict({**encoded, "labels": [LABELS.index(s) for s in frame["score"]]})
    train, dev = data.select(range(96)), data.select(range(300, 340))

    def model_init(trial=None):
        return AutoModelForSequenceClassification.from_pretrained(
            zoo["base"],
            num_labels=2,
            id2label=dict(enumerate(LABELS)),
            label2id={n: i for i, n in enumerate(LABELS)},
        )

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    args = TrainingArguments(
        output_dir=str(root / "out"),
        max_steps=6,
        per_device_train_batch_size=16,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        report_to="none",
        seed=7,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model_init=model_init,
        args=args,
        train_dataset=train,
        eval_dataset=dev,
        processing_class=tokenizer,
        compute_metrics=accuracy,
        callbacks=[SoupCallback(root / "pot", base=str(zoo["base"]))],
    )
    import optuna

    grid = {
        "learning_rate": [1e-3, 3e-3]
    }  # a grid: two random draws could pick one rate twice (identical models)
    trainer.hyperparameter_search(
        hp_space=lambda trial: {
            "learning_rate": trial.suggest_categorical("learning_rate", grid["learning_rate"])
        },
        backend="optuna",
        n_trials=2,
        direction="maximize",
        sampler=optuna.samplers.GridSampler(grid, seed=0),
    )
    return root / "pot"


def test_a_sweep_fills_the_pot_with_described_ingredients(pot, zoo):
    ingredients = sorted(p for p in pot.iterdir() if not p.name.startswith("."))
    assert len(ingredients) == 2
    for folder in ingredients:
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        record = json.loads((folder / INGREDIENT_FILE).read_text())
        assert record["base"] == str(zoo["base"])
        assert set(record["trial_params"]) == {"learning_rate"}
        assert record["hyperparameters"]["learning_rate"] == record["trial_params"]["learning_rate"]
        assert record["hyperparameters"]["max_steps"] == 6 and "output_dir" not in record["hyperparameters"]
        assert record["saved"] == "best" and "checkpoint-" in record["best_model_checkpoint"]
        assert 0 <= record["metrics"]["eval_accuracy"] <= 1


def test_the_pot_soups_through_the_cli(pot, zoo, reviews, tmp_path, capsys):
    out = tmp_path / "soup"
    argv = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(pot / "*"),
        "--dataset",
        str(reviews["train"]),
        "--report-split",
        str(reviews["test"]),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--selection-fraction",
        "0.25",
        "--max-length",
        "64",
        "--output",
        str(out),
        "--format",
        "json",
        "--quiet",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["candidates"]) == 2 and (out / "model.safetensors").is_file()
    assert all(c["training"]["trial_params"] for c in report["candidates"])


def test_checkpoint_soup_ignores_optimizer_and_scheduler_files(pot, zoo, reviews, tmp_path, capsys):
    """`--candidates "out/checkpoint-*"` averages checkpoints along one run; their pickles are never opened."""
    run = next(p for p in (pot.parent / "out").iterdir() if p.name.startswith("run-"))
    checkpoints = sorted(run.glob("checkpoint-*"))
    assert len(checkpoints) == 2 and all((c / "optimizer.pt").is_file() for c in checkpoints)
    marker = tmp_path / "pwned"
    for checkpoint in checkpoints:  # if anything unpickled these, the marker would appear
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
            with open(checkpoint / name, "wb") as handle:
                pickle.dump(Payload(str(marker)), handle)
    out = tmp_path / "soup"
    argv = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(run / "checkpoint-*"),
        "--recipe",
        "uniform",
        "--output",
        str(out),
        "--format",
        "json",
        "--quiet",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [i["id"] for i in report["mixture"]["ingredients"]] == [str(c) for c in checkpoints]
    average = {
        k: sum(load_file(str(c / "model.safetensors"))[k] for c in checkpoints) / 2
        for k in report["tensor_sha256"]
    }
    soup = load_file(str(out / "model.safetensors"))
    for name, tensor in soup.items():
        torch.testing.assert_close(tensor, average[name], atol=1e-6, rtol=0)
    assert not marker.exists()


def _tokenized(tokenizer, frame, max_length=64):
    encoded = tokenizer(list(frame["review"]), truncation=True, max_length=max_length)
    return Dataset.from_dict({**encoded, "labels": [LABELS.index(s) for s in frame["score"]]})


def test_greedy_scored_by_the_trainer_matches_greedy_scored_by_hf_soup(zoo, reviews, tmp_path):
    from hf_soup import SoupConfig, cook
    from hf_soup.evaluation.data import carve_selection, load_data

    _, selection = carve_selection(load_data(str(reviews["train"]), split="train"), 0.25, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_eval_batch_size=64,
        report_to="none",
        metric_for_best_model="accuracy",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=AutoModelForSequenceClassification.from_pretrained(zoo["a"]),
        args=args,
        eval_dataset=_tokenized(tokenizer, selection.to_pandas()),
        processing_class=tokenizer,
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    common = dict(base=str(zoo["base"]), candidates=[str(zoo["root"] / "runs" / "*")], recipe="greedy")
    by_trainer = cook(**common, trainer=trainer, output=str(tmp_path / "by-trainer"), quiet=True)
    by_soup = cook(
        SoupConfig(
            **common,
            dataset=str(reviews["train"]),
            report_split=str(reviews["test"]),
            text_column="review",
            label_column="score",
            selection_fraction=0.25,
            max_length=64,
            selection_metric="accuracy",
            output=str(tmp_path / "by-soup"),
        ),
        quiet=True,
    )
    assert by_trainer.mixture.weights() == by_soup.mixture.weights()
    assert by_trainer.report["task"]["selection_metric"] == "accuracy"
    ours = {c["id"]: c["selection"]["accuracy"] for c in by_soup.report["candidates"]}
    theirs = {c["id"]: c["selection"]["accuracy"] for c in by_trainer.report["candidates"]}
    assert theirs == pytest.approx(ours, abs=1.5 / len(selection))  # padding may flip a borderline example
    assert "SAME SPLIT" in " ".join(by_trainer.report["splits"]["notes"])
    soup = load_file(str(tmp_path / "by-trainer" / "model.safetensors"))
    state = trainer.model.state_dict()
    assert all(
        torch.equal(state[name], tensor) for name, tensor in soup.items()
    )  # trainer.model is the soup now
    card = (tmp_path / "by-trainer" / "README.md").read_text()
    assert "trainer" in card and (tmp_path / "by-trainer" / "soup.json").is_file()


@pytest.mark.slow
def test_two_processes_give_the_same_scores_and_soup_as_one(zoo, reviews, tmp_path):
    """`accelerate launch --num_processes 2 --cpu` (gloo) shards evaluation; results match one process."""
    args = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["root"] / "runs" / "*"),
        "--dataset",
        str(reviews["train"]),
        "--report-split",
        str(reviews["test"]),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--selection-fraction",
        "0.25",
        "--max-length",
        "64",
        "--batch-size",
        "24",
        "--recipe",
        "greedy",
        "--no-cache",
        "--format",
        "json",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "hf_soup", *args, "--output", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    two = subprocess.run(
        [*LAUNCH_TWO_CPU_PROCESSES, "-m", "hf_soup", *args, "--output", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    single, sharded = json.loads(one.stdout), json.loads(two.stdout)  # rank 1 printed nothing: one document
    assert (single["processes"], sharded["processes"]) == (1, 2)
    assert sharded["mixture"]["ingredients"] == single["mixture"]["ingredients"]
    assert [t["accepted"] for t in sharded["trajectory"]] == [t["accepted"] for t in single["trajectory"]]
    for a, b in zip(single["candidates"], sharded["candidates"]):
        assert a["id"] == b["id"] and a["selection"] == pytest.approx(b["selection"], abs=1e-9)
        assert a["selection_loss"] == pytest.approx(b["selection_loss"], rel=1e-5)
        for split, metrics in a["report"].items():
            assert metrics == pytest.approx(b["report"][split], abs=1e-9)
    assert sharded["soup"]["report"] == single["soup"]["report"]
    assert sharded["tensor_sha256"] == single["tensor_sha256"]
    # 200 report examples in batches of 24 make 9 batches: the last step of 2 processes is uneven.
    assert sum(
        p["examples"] for p in sharded["cache"]["forward_passes"] if p["split"] == "test.csv"
    ) == 200 * len([p for p in sharded["cache"]["forward_passes"] if p["split"] == "test.csv"])
    assert (tmp_path / "two" / "soup.json").is_file() and not list(tmp_path.glob(".two.*"))


@pytest.mark.slow
def test_an_error_under_two_processes_is_reported_once_and_writes_nothing(zoo, reviews, tmp_path):
    out = tmp_path / "soup"
    args = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["root"] / "runs" / "*"),
        "--dataset",
        str(reviews["train"]),
        "--text-column",
        "no-such-column",
        "--label-column",
        "score",
        "--selection-fraction",
        "0.25",
        "--output",
        str(out),
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    two = subprocess.run(
        [*LAUNCH_TWO_CPU_PROCESSES, "-m", "hf_soup", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode != 0
    assert two.stderr.count("hf-soup: error:") == 1 and "no column 'no-such-column'" in two.stderr
    assert "Traceback" not in two.stderr.split("hf-soup: error:")[0]  # no rank crashed before reporting
    assert not out.exists() and not list(tmp_path.glob(".soup.*"))


def test_both_scorers_implement_the_scorer_protocol(zoo, reviews, tmp_path, monkeypatch):
    """`scoring.MixtureScorer` is what the stages use: hf-soup's `Scorer` and `TrainerScorer` both implement all of
    it (TrainerScorer lacked `load` and `subset_value`), and a trainer's `subset_value` is the metric of that
    subset of its eval dataset, counted here from the trainer's own predictions."""
    from hf_soup import cook
    from hf_soup.mixture import Mixture
    from hf_soup.pipeline import scored_stages
    from hf_soup.scoring.scorer import MixtureScorer, Scorer
    from hf_soup.scoring.trainer import TrainerScorer

    scorers = []
    recipe_stage = scored_stages.recipe_stage

    def recording(config, checked, scorer, quiet):
        scorers.append(scorer)
        return recipe_stage(config, checked, scorer, quiet)

    monkeypatch.setattr(scored_stages, "recipe_stage", recording)
    candidates = [str(zoo["a"]), str(zoo["b"])]
    cook(
        base=str(zoo["base"]),
        candidates=candidates,
        dataset=str(reviews["train"]),
        text_column="review",
        label_column="score",
        recipe="uniform",
        max_eval_examples=16,
        quiet=True,
    )
    selection = pd.read_csv(reviews["train"]).head(60)
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_eval_batch_size=64,
        report_to="none",
        metric_for_best_model="accuracy",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=AutoModelForSequenceClassification.from_pretrained(zoo["a"]),
        args=args,
        eval_dataset=_tokenized(tokenizer, selection),
        processing_class=tokenizer,
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )
    cook(base=str(zoo["base"]), candidates=candidates, trainer=trainer, recipe="greedy", quiet=True)
    assert [type(scorer) for scorer in scorers] == [Scorer, TrainerScorer]
    assert all(isinstance(scorer, MixtureScorer) for scorer in scorers)  # every member of the protocol
    by_trainer = scorers[1]
    labels = np.asarray([LABELS.index(s) for s in selection["score"]])
    rows = np.arange(0, len(labels), 3)
    single = Mixture.uniform("single", [str(zoo["b"])])
    value = by_trainer.subset_value(single, rows)
    by_trainer.load(single)
    predicted = trainer.predict(trainer.eval_dataset).predictions.argmax(-1)
    assert value == pytest.approx(float(np.mean(predicted[rows] == labels[rows])))
