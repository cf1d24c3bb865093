"""Real-world inputs: bases that ship a head of their own."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
import torch
from conftest import LABELS, copy_model, installed_script, tiny_config
from safetensors.torch import load_file, save_file
from sklearn.metrics import accuracy_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    BertModel,
)

HF_SOUP = installed_script("hf-soup")


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
    result = subprocess.run(
        [HF_SOUP, "--base", str(base), "--candidates", str(zoo["a"]), str(zoo["b"]), "--dataset", str(reviews["train"]),
         "--report-split", str(reviews["test"]), "--text-column", "review", "--label-column", "score",
         "--max-length", "64", "--max-eval-examples", "40", "--recipe", "wise", "--wise-of", "uniform",
         "--alpha", alpha, "--output", str(out), "--format", "json", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
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
    save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    return folder


def test_bf16_candidates_give_a_bf16_soup_scored_as_written(zoo, reviews, tmp_path):
    runs = [to_bf16(zoo[k], tmp_path / "runs" / k) for k in "abc"]
    out = tmp_path / "soup"
    result = subprocess.run(
        [HF_SOUP, "--base", str(zoo["base"]), "--candidates", *map(str, runs), "--dataset", str(reviews["train"]),
         "--report-split", str(reviews["test"]), "--text-column", "review", "--label-column", "score",
         "--max-length", "64", "--recipe", "uniform", "--output", str(out), "--format", "json", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
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
            batch = tokenizer(list(frame["review"][start : start + 64]), truncation=True, max_length=64,
                              padding=True, return_tensors="pt")  # fmt: skip
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
    result = subprocess.run([HF_SOUP, "--base", str(tmp_path / "base"), "--candidates", *map(str, adapters),
                             "--recipe", "uniform", "--output", str(out), "--quiet"],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
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
