"""End-to-end cases real users have: sharded checkpoints (local and Hub), STS-B regression, MNLI's two report
splits, a pruned soup whose second pass removes an ingredient, learned soups of label-permuted and LoRA candidates.
Each result is checked against an independent computation (plain transformers, peft, scipy, or arithmetic)."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LABELS, copy_model, data_dir, fine_tune, installed_script, run_main
from hub_server import HubServer
from safetensors.torch import load_file, save_file
from scipy.stats import pearsonr
from test_claims import with_constant_head
from test_compat import permute_labels
from test_hub import TOKEN, hub_env
from test_lora import merged_state, seq_cls  # noqa: F401  (a fixture)
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification

HF_SOUP = installed_script("hf-soup")


def cli(*args: str, env=None) -> dict:
    """The CLI's JSON report: in this process, or (with `env`, for the test Hub) in a subprocess."""
    if env is None:
        result = run_main(*args, "--format", "json", "--quiet")
    else:
        result = subprocess.run(
            [HF_SOUP, *args, "--format", "json", "--quiet"],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def state_of(folder) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as transformers loads them (sharded or not)."""
    return AutoModelForSequenceClassification.from_pretrained(folder).state_dict()


def assert_average(written: dict, folders, atol=1e-6) -> None:
    states = [load_file(str(f / "model.safetensors")) for f in folders]
    for name, tensor in written.items():
        if tensor.is_floating_point():
            expected = sum(s[name].double() for s in states) / len(states)
            torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=atol)


def sharded(source, target):
    AutoModelForSequenceClassification.from_pretrained(source).save_pretrained(target, max_shard_size="300KB")
    assert (target / "model.safetensors.index.json").is_file() and not (target / "model.safetensors").exists()
    return target


@pytest.mark.slow
def test_sharded_checkpoints_local_and_from_the_hub(zoo, tmp_path):
    runs = [sharded(zoo[k], tmp_path / "runs" / k) for k in "ab"]
    local = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        *map(str, runs),
        "--recipe",
        "uniform",
        "--output",
        str(tmp_path / "local"),
    )
    assert len(local["mixture"]["ingredients"]) == 2
    assert_average(state_of(tmp_path / "local"), [zoo["a"], zoo["b"]])

    hub = HubServer(tmp_path / "hub").start()
    try:
        hub.tokens[TOKEN] = "org"
        hub.upload_folder("org/base", zoo["base"])
        for key, folder in zip("ab", runs):
            (folder / "README.md").write_text("---\nbase_model: org/base\n---\n")
            hub.upload_folder(f"org/sharded-{key}", folder)
        env = hub_env(hub, tmp_path)
        cli(
            "--base",
            "org/base",
            "--candidates",
            "org/sharded-*",
            "--recipe",
            "uniform",
            "--output",
            str(tmp_path / "from-hub"),
            env=env,
        )
        shards = [p for p in hub.requests("GET", "org/sharded-a/resolve") if p.endswith(".safetensors")]
        assert len(shards) > 1  # every shard was fetched, at the pinned revision
    finally:
        hub.stop()
    assert_average(state_of(tmp_path / "from-hub"), [zoo["a"], zoo["b"]])


def pair_frame(frame: pd.DataFrame) -> pd.DataFrame:
    text = frame["review"].str.split(".", n=1)
    return pd.DataFrame({"sentence1": text.str[0], "sentence2": text.str[1].fillna("").str[:200]})


@pytest.fixture(scope="module")
def stsb(zoo, tmp_path_factory):
    """Regression models (num_labels=1) and a GLUE STS-B-format copy of real reviews, scored 4 when great and 1
    otherwise, plus a little seeded noise. Each model is a sentiment fine-tune of the zoo whose head reads out
    logit(great) − logit(other): a real, input-dependent score."""
    root = tmp_path_factory.mktemp("stsb")
    frame = pd.read_csv(data_dir() / "train.csv").sample(n=500, random_state=3).reset_index(drop=True)
    rng = np.random.default_rng(0)
    data = pair_frame(frame).assign(
        label=np.where(frame["score"] == "great", 4.0, 1.0) + rng.normal(0, 0.3, len(frame))
    )
    (root / "data").mkdir()
    data.iloc[:350].to_csv(root / "data" / "train.csv", index=False)
    data.iloc[350:].to_csv(root / "data" / "validation.csv", index=False)
    for key in "abc":
        folder = copy_model(zoo[key], root / "runs" / f"r{key}")
        state = load_file(str(folder / "model.safetensors"))
        great, other = LABELS.index("great"), LABELS.index("other")
        # The tiny fine-tunes' logit gaps vary by ~1e-3: scaled up, they make a score with a real spread.
        weight = state["classifier.weight"][great] - state["classifier.weight"][other]
        state["classifier.weight"] = 1000 * weight[None]
        state["classifier.bias"] = torch.zeros(1)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config.update(id2label={"0": "score"}, label2id={"score": 0}, problem_type="regression")
        (folder / "config.json").write_text(json.dumps(config))
        state["classifier.bias"] = torch.tensor([2.5 - float(predictions(folder, data, zoo["base"]).mean())])
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})  # centred near 2.5
    return root


def predictions(folder, frame: pd.DataFrame, tokenizer_folder=None) -> np.ndarray:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder or folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        batch = tokenizer(
            list(frame["sentence1"]),
            list(frame["sentence2"].fillna("")),
            truncation=True,
            max_length=128,
            padding=True,
            return_tensors="pt",
        )
        return model(**batch).logits.numpy()


@pytest.mark.slow
def test_stsb_regression_selects_on_mse_and_reports_pearson_with_intervals(stsb, zoo, tmp_path):
    out = tmp_path / "soup"
    report = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(stsb / "runs" / "*"),
        "--task",
        "glue/stsb",
        "--dataset",
        str(stsb / "data"),
        "--recipe",
        "greedy",
        "--output",
        str(out),
    )
    assert report["task"]["selection_metric"] == "loss" and report["task"]["metrics"] == [
        "pearson",
        "spearmanr",
    ]
    validation = pd.read_csv(stsb / "data" / "validation.csv")
    predicted = predictions(out, validation)[:, 0]
    soup = report["soup"]["report"]["validation"]
    assert predicted.std() > 0.1  # a real score, not a constant
    assert soup["pearson"] == pytest.approx(pearsonr(validation["label"], predicted)[0], abs=1e-5)
    assert report["soup"]["report_loss"]["validation"] == pytest.approx(
        float(np.mean((predicted - validation["label"]) ** 2)), rel=1e-4
    )  # the loss of a regression is the mean squared error
    interval = report["comparisons"]["validation"]["soup"]["pearson"]
    assert interval["low"] <= interval["delta"] <= interval["high"]
    # Selection on MSE: the candidates are ranked by their selection MSE, lowest first.
    losses = [c["selection_loss"] for c in report["candidates"]]
    assert losses == sorted(losses)


def test_learned_regression_soup_has_no_temperature(stsb, zoo, tmp_path):
    report = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(stsb / "runs" / "*"),
        "--task",
        "glue/stsb",
        "--dataset",
        str(stsb / "data"),
        "--recipe",
        "learned",
        "--learn-epochs",
        "1",
        "--max-eval-examples",
        "64",
    )
    assert report["learned"]["temperature"] == 1.0  # a temperature would rescale the predictions themselves
    assert report["soup"]["selection_loss"] <= report["uniform"]["selection_loss"] + 1e-9


MNLI_LABELS = ["entailment", "neutral", "contradiction"]


@pytest.fixture(scope="module")
def mnli(zoo, tmp_path_factory):
    """Three-label fine-tunes and an MNLI-format copy of real reviews with both validation splits."""
    root = tmp_path_factory.mktemp("mnli")
    frame = pd.read_csv(data_dir() / "train.csv").sample(n=420, random_state=4).reset_index(drop=True)
    data = pair_frame(frame).rename(columns={"sentence1": "premise", "sentence2": "hypothesis"})
    data["label"] = np.where(
        frame["score"] == "great", 0, np.where(frame["product"].str.len() % 2 == 0, 1, 2)
    )
    (root / "data").mkdir()
    data.iloc[:300].to_csv(root / "data" / "train.csv", index=False)
    data.iloc[300:360].to_csv(root / "data" / "validation_matched.csv", index=False)
    data.iloc[360:].to_csv(root / "data" / "validation_mismatched.csv", index=False)
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    texts = [f"{a} {b}" for a, b in zip(data["premise"], data["hypothesis"])][:300]
    labels = dict(id2label=dict(enumerate(MNLI_LABELS)), label2id={n: i for i, n in enumerate(MNLI_LABELS)})
    for name, lr, seed in (("m1", 3e-3, 0), ("m2", 1e-3, 1)):
        torch.manual_seed(6)
        model = BertForSequenceClassification.from_pretrained(zoo["base"], num_labels=3, **labels)
        fine_tune(model, tokenizer, texts, data["label"].tolist()[:300], lr, seed, steps=15)
        model.save_pretrained(root / "runs" / name)
    return root


def test_mnli_reports_on_both_validation_splits(mnli, zoo, tmp_path):
    out = tmp_path / "soup"
    report = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(mnli / "runs" / "*"),
        "--task",
        "glue/mnli",
        "--dataset",
        str(mnli / "data"),
        "--recipe",
        "uniform",
        "--output",
        str(out),
    )
    splits = ["validation_matched", "validation_mismatched"]
    assert list(report["splits"]["report"]) == splits and list(report["comparisons"]) == splits
    for split in splits:
        frame = pd.read_csv(mnli / "data" / f"{split}.csv").rename(
            columns={"premise": "sentence1", "hypothesis": "sentence2"}
        )
        predicted = predictions(out, frame).argmax(-1)
        assert report["soup"]["report"][split]["accuracy"] == pytest.approx(
            float(np.mean(predicted == frame["label"]))
        )
    card = (out / "README.md").read_text()
    assert all(f"report {split}" in card for split in splits)


def constant_loss(d: float, q: float) -> float:
    """Mean cross-entropy of logits (0, d) for every example, when a share q of the labels is the second one."""
    p = 1 / (1 + math.exp(-d))
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


def simulate_pruned(offsets: dict[str, float], q: float, passes: int) -> list[str]:
    """Recipe 'pruned' by hand: constant-logit candidates soup to the mean of their logits."""
    soup = sorted(offsets, key=lambda c: (constant_loss(offsets[c], q), c))
    best = constant_loss(np.mean([offsets[c] for c in soup]), q)
    for _ in range(passes):
        removed = False
        for candidate in list(reversed(soup)):
            rest = [c for c in soup if c != candidate]
            if len(soup) > 1 and constant_loss(np.mean([offsets[c] for c in rest]), q) <= best:
                soup, best, removed = rest, constant_loss(np.mean([offsets[c] for c in rest]), q), True
        if not removed:
            break
    return soup


@pytest.mark.slow
def test_a_second_pruned_pass_removes_what_the_first_kept(zoo, reviews, tmp_path):
    # Candidates whose heads ignore the input: logits (0, d). On a selection split with exactly 35% 'other', the
    # first pass removes one of them, and only then does removing two more lower the loss.
    offsets = {"p1": 3.19, "p2": -5.4, "p3": -2.3, "p4": -5.91, "p5": 4.22}
    bodies = [zoo["a"], zoo["b"], zoo["c"], zoo["d"], zoo["a"]]
    for (name, d), body in zip(offsets.items(), bodies):
        with_constant_head(body, tmp_path / "runs" / name, [0.0, d])
    frame = pd.read_csv(data_dir() / "train.csv")
    selection = pd.concat([frame[frame.score == "great"].head(65), frame[frame.score == "other"].head(35)])
    selection.to_csv(tmp_path / "selection.csv", index=False)
    report = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(tmp_path / "runs" / "*"),
        "--dataset",
        str(reviews["train"]),
        "--selection-split",
        str(tmp_path / "selection.csv"),
        "--report-split",
        str(reviews["test"]),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--recipe",
        "pruned",
        "--passes",
        "3",
    )
    expected = simulate_pruned(offsets, 0.35, passes=3)
    assert sorted(i["id"].rsplit("/", 1)[-1] for i in report["mixture"]["ingredients"]) == sorted(expected)
    removals = [t for t in report["trajectory"] if t["action"] == "remove" and t["accepted"]]
    first_pass = len(offsets)  # the first pass tries every candidate once
    assert any(t["step"] > first_pass for t in removals), report["trajectory"]
    assert len(expected) < len(offsets) - 1  # more than the first pass's removal


def test_learned_soup_of_label_permuted_candidates_is_the_aligned_one(zoo, reviews, tmp_path):
    permuted = permute_labels(copy_model(zoo["b"], tmp_path / "b-permuted"))
    args = [
        "--base",
        str(zoo["base"]),
        "--dataset",
        str(reviews["train"]),
        "--report-split",
        str(reviews["test"]),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--max-length",
        "64",
        "--max-eval-examples",
        "48",
        "--recipe",
        "learned",
        "--learn-epochs",
        "1",
    ]
    aligned = cli(*args, "--candidates", str(zoo["a"]), str(zoo["b"]), "--output", str(tmp_path / "aligned"))
    mixed = cli(*args, "--candidates", str(zoo["a"]), str(permuted), "--output", str(tmp_path / "mixed"))
    alpha_aligned, alpha_mixed = aligned["learned"]["alpha"]["*"], mixed["learned"]["alpha"]["*"]
    assert alpha_mixed[str(zoo["a"])] == pytest.approx(alpha_aligned[str(zoo["a"])], abs=1e-6)
    assert alpha_mixed[str(permuted)] == pytest.approx(alpha_aligned[str(zoo["b"])], abs=1e-6)
    # The same soup, whichever label order the reference candidate chose: heads compared label by label.
    ours, theirs = (load_file(str(tmp_path / k / "model.safetensors")) for k in ("mixed", "aligned"))
    order = [json.loads((tmp_path / k / "config.json").read_text())["label2id"] for k in ("mixed", "aligned")]
    rows = [
        order[0][label] for label in sorted(order[1], key=order[1].get)
    ]  # mixed's rows in aligned's order
    for name, tensor in theirs.items():
        mine = ours[name][rows] if name.startswith("classifier.") else ours[name]
        torch.testing.assert_close(mine.double(), tensor.double(), rtol=0, atol=1e-6)


def test_learned_soup_of_lora_candidates_is_the_weighted_merge(seq_cls, reviews, tmp_path):  # noqa: F811
    out = tmp_path / "soup"
    adapters = [seq_cls[k] for k in "def"]
    report = cli(
        "--base",
        str(seq_cls["base"]),
        "--candidates",
        *map(str, adapters),
        "--dataset",
        str(reviews["train"]),
        "--report-split",
        str(reviews["test"]),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--max-length",
        "64",
        "--max-eval-examples",
        "48",
        "--recipe",
        "learned",
        "--learn-epochs",
        "1",
        "--output",
        str(out),
    )
    alpha = report["learned"]["alpha"]["*"]
    merged = {str(folder): merged_state(seq_cls["base"], folder) for folder in adapters}
    written = load_file(str(out / "model.safetensors"))
    for name, tensor in written.items():
        if tensor.is_floating_point():
            expected = sum(alpha[cid] * merged[cid][name].double() for cid in alpha)
            torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-5)
    assert sum(alpha.values()) == pytest.approx(1.0) and len(alpha) == 3
