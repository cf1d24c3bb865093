"""Real-world inputs: bases that ship a head of their own."""

from __future__ import annotations

import json
import subprocess

import torch
from conftest import LABELS, installed_script, tiny_config
from safetensors.torch import load_file
from transformers import BertForSequenceClassification, BertModel

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
