"""Real-world inputs: bases that ship a head of their own."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LABELS, copy_model, run_main, tiny_config
from datasets import Dataset
from safetensors.torch import load_file, save_file
from sklearn.metrics import accuracy_score, precision_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    BertModel,
)


def classifier_base(zoo, folder, labels: list[str]):
    """The zoo's base body under a classifier head of its own (as `microsoft/resnet-50` ships ImageNet's)."""
    body = BertModel.from_pretrained(zoo["base"])
    torch.manual_seed(7)
    model = BertForSequenceClassification(
        tiny_config(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
        )
    )
    model.bert.load_state_dict(body.state_dict())
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (zoo["base"] / name).is_file():
            (folder / name).write_bytes((zoo["base"] / name).read_bytes())
    return folder


def wise(zoo, reviews, base, out, alpha: str) -> dict:
    result = run_main(
        "--base",
        str(base),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
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
        "40",
        "--recipe",
        "wise",
        "--wise-of",
        "uniform",
        "--alpha",
        alpha,
        "--output",
        str(out),
        "--format",
        "json",
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_base_with_another_labels_head_is_a_base_with_no_head(zoo, reviews, tmp_path):
    base = classifier_base(zoo, tmp_path / "imagenet-like", ["cat", "dog", "car"])
    report = wise(zoo, reviews, base, tmp_path / "soup", "0")
    assert any("treated as a base with no head" in w for w in report["compatibility"]["warnings"])
    written = load_file(str(tmp_path / "soup" / "model.safetensors"))
    own = load_file(str(base / "model.safetensors"))
    a, b = (load_file(str(zoo[k] / "model.safetensors")) for k in "ab")
    for name, tensor in written.items():
        if name.startswith("classifier."):  # alpha 0 keeps the fine-tuned soup's head
            torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, rtol=0, atol=1e-6)
        elif tensor.is_floating_point():  # and the base's body
            torch.testing.assert_close(tensor, own[name], rtol=0, atol=0)


def test_a_base_head_with_the_same_labels_in_another_order_is_permuted(zoo, reviews, tmp_path):
    base = classifier_base(zoo, tmp_path / "reversed", list(reversed(LABELS)))
    report = wise(zoo, reviews, base, tmp_path / "soup", "0.5")
    assert "interpolated like the body" in report["wise"]["head"]
    written = load_file(str(tmp_path / "soup" / "model.safetensors"))
    own = load_file(str(base / "model.safetensors"))
    a, b = (load_file(str(zoo[k] / "model.safetensors")) for k in "ab")
    for name in ("classifier.weight", "classifier.bias"):
        aligned = own[name][[1, 0]]  # the base's rows in the candidates' label order
        expected = 0.5 * aligned.double() + 0.25 * (a[name].double() + b[name].double())
        torch.testing.assert_close(written[name].double(), expected, rtol=0, atol=1e-6)


def to_bf16(source, target):
    folder = copy_model(source, target)
    state = load_file(str(folder / "model.safetensors"))
    save_file(
        {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return folder


def test_bf16_candidates_give_a_bf16_soup_scored_as_written(zoo, reviews, tmp_path):
    runs = [to_bf16(zoo[k], tmp_path / "runs" / k) for k in "abc"]
    out = tmp_path / "soup"
    result = run_main(
        "--base",
        str(zoo["base"]),
        "--candidates",
        *map(str, runs),
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
    stored = {t.dtype for t in load_file(str(out / "model.safetensors")).values() if t.is_floating_point()}
    assert stored == {torch.bfloat16} and report["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # Plain transformers, loading the written folder in its own dtype, gets the reported accuracy.
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype="auto").eval()
    assert model.dtype == torch.bfloat16
    frame = pd.read_csv(reviews["test"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        predicted = []
        for start in range(0, len(frame), 64):
            batch = tokenizer(
                list(frame["review"][start : start + 64]),
                truncation=True,
                max_length=64,
                padding=True,
                return_tensors="pt",
            )
            predicted += model(**batch).logits.argmax(-1).tolist()
    labels = [LABELS.index(s) for s in frame["score"]]
    assert report["soup"]["report"]["test.csv"]["accuracy"] == pytest.approx(
        accuracy_score(labels, predicted)
    )


def test_lora_updates_on_a_bf16_base_stay_float32_until_souped(tmp_path, tokenizer_dir):
    """Each candidate's W + s·BA is not rounded to bf16 before averaging: the soup is the float64 reference,
    rounded once."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config()).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "base")
    adapters = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = BertForSequenceClassification.from_pretrained(tmp_path / "base", dtype=torch.float32)
        config = LoraConfig(r=4, lora_alpha=1, target_modules=["query", "value"], init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # small updates, as fine-tuning makes: a few bf16 steps of W
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(0.01)
        peft_model.save_pretrained(tmp_path / "runs" / str(seed))
        adapters.append(tmp_path / "runs" / str(seed))
    out = tmp_path / "soup"
    result = run_main(
        "--base",
        str(tmp_path / "base"),
        "--candidates",
        *map(str, adapters),
        "--recipe",
        "uniform",
        "--output",
        str(out),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    soup = load_file(str(out / "model.safetensors"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    delta = torch.zeros_like(base[name], dtype=torch.float64)
    for folder in adapters:
        weights = load_file(str(folder / "adapter_model.safetensors"))
        prefix = "base_model.model.bert.encoder.layer.0.attention.self.query"
        a, b = weights[f"{prefix}.lora_A.weight"].double(), weights[f"{prefix}.lora_B.weight"].double()
        delta += (1 / 4) * (b @ a) / len(adapters)  # scale = lora_alpha / r
    reference = base[name].double() + delta
    assert soup[name].dtype == torch.bfloat16
    exact = (soup[name] == reference.to(torch.bfloat16)).float().mean().item()
    assert exact > 0.999, f"only {exact:.1%} of elements equal the float64 reference rounded to bf16"
    ulp = torch.finfo(torch.bfloat16).eps * reference.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    assert ((soup[name].double() - reference).abs() <= ulp).all()


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_main(*args)


def test_fractional_labels_are_refused_naming_the_column(zoo, reviews, tmp_path):
    frame = pd.read_csv(reviews["train"]).head(120)
    frame["score"] = np.resize([0.3, 0.9, 1.7], len(frame))
    frame.to_csv(tmp_path / "floats.csv", index=False)
    result = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        "--dataset",
        str(tmp_path / "floats.csv"),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--output",
        str(tmp_path / "soup"),
    )
    assert result.returncode == 2 and result.stderr.count("hf-soup: error:") == 1
    assert "label column 'score' holds numbers that are not class ids (e.g. " in result.stderr
    assert all(value in result.stderr for value in ("0.3", "0.9", "1.7"))
    assert "--regression" in result.stderr and not (tmp_path / "soup").exists()


def test_missing_texts_are_counted_and_fatal_with_strict(zoo, reviews, tmp_path):
    frame = pd.read_csv(reviews["test"])
    blank = frame.index[::10]
    frame.loc[blank, "review"] = np.resize(["", "   ", None], len(blank))
    frame.to_csv(tmp_path / "test.csv", index=False)
    args = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        "--dataset",
        str(reviews["train"]),
        "--report-split",
        str(tmp_path / "test.csv"),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--max-length",
        "64",
        "--recipe",
        "uniform",
    ]
    result = cli(*args, "--format", "json", "--quiet")
    assert result.returncode == 0, result.stderr
    expected = int(pd.read_csv(tmp_path / "test.csv")["review"].fillna("").str.strip().eq("").sum())
    assert expected == len(blank)
    assert any(
        f"test.csv split has {expected} example(s) with a missing or blank text" in w
        for w in json.loads(result.stdout)["warnings"]
    )
    strict = cli(*args, "--strict", "--output", str(tmp_path / "soup"))
    assert strict.returncode == 2 and "--strict: The test.csv split has" in strict.stderr
    assert not (tmp_path / "soup").exists()


def with_packed_tensor(source, target, values: list[int], dtype=torch.uint32):
    """A copy of `source` that also stores `quant.packed` as `dtype` (packed or quantized data)."""
    folder = copy_model(source, target)
    state = load_file(str(folder / "model.safetensors"))
    state["quant.packed"] = torch.tensor(
        values, dtype=torch.float64 if dtype.is_floating_point else torch.int64
    ).to(dtype)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("dtype", [torch.uint32, torch.float8_e4m3fn])
def test_packed_tensors_are_copied_when_identical_and_refused_when_not(zoo, tmp_path, dtype):
    values = [7, 4_000_000_000] if dtype == torch.uint32 else [7, 448]  # 448: float8_e4m3fn's largest value
    same = [with_packed_tensor(zoo[k], tmp_path / "same" / k, values, dtype) for k in "ab"]
    out = tmp_path / "soup"
    result = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        *map(str, same),
        "--recipe",
        "uniform",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    packed = load_file(str(out / "model.safetensors"))["quant.packed"]
    assert (
        packed.dtype == dtype and packed.to(torch.float64).tolist() == values
    )  # copied bit for bit, not averaged

    pairs = (("a", 1), ("b", 2))
    differ = [with_packed_tensor(zoo[k], tmp_path / "differ" / k, [7, value], dtype) for k, value in pairs]
    result = cli(
        "--base",
        str(zoo["base"]),
        "--candidates",
        *map(str, differ),
        "--recipe",
        "uniform",
        "--output",
        str(tmp_path / "refused"),
    )
    assert result.returncode == 2 and result.stderr.count("hf-soup: error:") == 1
    assert f"quant.packed is stored as {dtype}" in result.stderr and "Dequantize" in result.stderr
    assert not (tmp_path / "refused").exists()


def test_the_trainer_path_matches_labels_by_name_and_takes_any_metric(zoo, reviews, tmp_path):
    """The trainer's data and model list the labels as (other, great); one candidate stores them that way too."""
    from test_compat import permute_labels
    from transformers import Trainer, TrainingArguments

    from hf_soup import cook

    reversed_b = permute_labels(copy_model(zoo["b"], tmp_path / "b-reversed"))
    trainer_labels = ["other", "great"]
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])

    def tokenized(path):
        frame = pd.read_csv(path).head(80)
        encoded = tokenizer(list(frame["review"]), truncation=True, max_length=64)
        return Dataset.from_dict(
            {**encoded, "labels": [trainer_labels.index(s) for s in frame["score"]]}
        ), frame

    selection, selection_frame = tokenized(reviews["train"])
    report_split, _ = tokenized(reviews["test"])

    def metrics(prediction):
        predicted = prediction.predictions.argmax(-1)
        return {
            "accuracy": float((predicted == prediction.label_ids).mean()),
            "precision": float(precision_score(prediction.label_ids, predicted, zero_division=0)),
        }

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_eval_batch_size=32,
        report_to="none",
        metric_for_best_model="accuracy",
        use_cpu=True,
        disable_tqdm=True,
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        permute_labels(copy_model(zoo["a"], tmp_path / "live"))
    )
    trainer = Trainer(
        model=model, args=args, eval_dataset=selection, processing_class=tokenizer, compute_metrics=metrics
    )
    result = cook(
        base=str(zoo["base"]),
        candidates=[str(zoo["a"]), str(reversed_b)],
        trainer=trainer,
        recipe="greedy",
        report_dataset=report_split,
        quiet=True,
    )
    report = result.report
    for candidate in report[
        "candidates"
    ]:  # each candidate's accuracy, by label name, from plain transformers
        own = AutoModelForSequenceClassification.from_pretrained(candidate["id"]).eval()
        with torch.no_grad():
            batch = tokenizer(
                list(selection_frame["review"]),
                truncation=True,
                max_length=64,
                padding=True,
                return_tensors="pt",
            )
            names = [own.config.id2label[i] for i in own(**batch).logits.argmax(-1).tolist()]
        expected = accuracy_score(list(selection_frame["score"]), names)
        assert candidate["selection"]["accuracy"] == pytest.approx(expected), candidate["id"]
        assert "precision" in candidate["selection"]
    assert "precision" not in report["comparisons"]["report"]["soup"]  # reported, without an interval
    assert "accuracy" in report["comparisons"]["report"]["soup"]
    assert trainer.model.config.id2label == {0: "other", 1: "great"}
