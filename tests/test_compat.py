"""The compatibility check: rejections with reasons, label alignment, header-only reads, pickle safety."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import copy_model, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_soup.candidates.compat import check_compatibility
from hf_soup.checkpoints.weights import TensorSource
from hf_soup.errors import IncompatibleCandidatesError, NoCandidatesError, PickleRefusedError
from hf_soup.merge.materialize import Workbench
from hf_soup.mixture import Mixture


def rewrite(folder, change_state=None, change_config=None):
    if change_state:
        state = load_file(str(folder / "model.safetensors"))
        change_state(state)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if change_config:
        config = json.loads((folder / "config.json").read_text())
        change_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def permute_labels(folder):
    def swap_rows(state):
        state["classifier.weight"] = state["classifier.weight"].flip(0).contiguous()
        state["classifier.bias"] = state["classifier.bias"].flip(0).contiguous()

    def swap_names(config):
        config["id2label"] = {"0": "other", "1": "great"}
        config["label2id"] = {"other": 0, "great": 1}

    return rewrite(folder, swap_rows, swap_names)


def test_permuted_labels_are_aligned_and_predict_the_same(zoo, tmp_path, reviews, tokenizer_dir):
    permuted = permute_labels(copy_model(zoo["a"], tmp_path / "a_permuted"))
    report, sources = check_compatibility(zoo["base"], [str(zoo["a"]), str(permuted)])
    assert not report.rejected and len(report.permutations) == 1
    assert sorted(report.head_tensors) == ["classifier.bias", "classifier.weight"]
    # The soup of a model and its label-permuted copy is the model itself: same predictions, label by label.
    model = AutoModelForSequenceClassification.from_pretrained(report.accepted[0].local_dir)
    original = AutoModelForSequenceClassification.from_pretrained(zoo["a"])
    Workbench(model, sources).load(Mixture.uniform("u", [str(zoo["a"]), str(permuted)]))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    import pandas as pd

    texts = pd.read_csv(reviews["test"])["review"].tolist()[:32]
    batch = tokenizer(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        souped = model(**batch).logits
        reference = original(**batch).logits
    for column, label in enumerate(report.label_names):
        torch.testing.assert_close(
            souped[:, column], reference[:, original.config.label2id[label]], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (
            lambda f: rewrite(
                f,
                change_config=lambda c: c.update(
                    id2label={"0": "neg", "1": "pos"}, label2id={"neg": 0, "pos": 1}
                ),
            ),
            "label set",
        ),
        (lambda f: rewrite(f, change_state=lambda s: s.update({"classifier.bias": torch.zeros(3)})), "shape"),
        (lambda f: rewrite(f, change_state=lambda s: s.pop("bert.pooler.dense.bias")), "tensor names differ"),
        (
            lambda f: rewrite(f, change_config=lambda c: c.update(architectures=["BertForMaskedLM"])),
            "architecture",
        ),
        (
            lambda f: rewrite(f, change_config=lambda c: c.update(auto_map={"AutoModel": "x.Y"})),
            "custom code",
        ),
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: (f / "model.safetensors").unlink(), "no model weights"),
        (
            lambda f: (f / "model.safetensors").write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1'),
            "not a valid safetensors",
        ),
    ],
)
def test_bad_candidates_are_rejected_with_reason(zoo, tmp_path, mutate, reason):
    bad = copy_model(zoo["b"], tmp_path / "bad")
    mutate(bad)
    report, _ = check_compatibility(zoo["base"], [str(zoo["a"]), str(zoo["c"]), str(bad)])
    assert sorted(c.id for c in report.accepted) == [str(zoo["a"]), str(zoo["c"])]
    assert len(report.rejected) == 1 and reason in report.rejected[0].reason
    with pytest.raises(IncompatibleCandidatesError, match="--strict"):
        report.raise_if_unusable(strict=True)
    report.raise_if_unusable(strict=False)


def test_too_few_candidates(zoo, tmp_path):
    report, _ = check_compatibility(zoo["base"], [str(zoo["a"])])
    with pytest.raises(NoCandidatesError, match="at least 2"):
        report.raise_if_unusable()
    with pytest.raises(NoCandidatesError, match="No candidate folder matches"):
        check_compatibility(zoo["base"], [str(tmp_path / "nothing-*")])


def test_wrong_base_is_refused(zoo, tmp_path):
    other = tmp_path / "other_base"
    from transformers import BertModel

    BertModel(tiny_config(hidden_size=48, intermediate_size=96)).save_pretrained(other)
    with pytest.raises(IncompatibleCandidatesError, match="--base"):
        check_compatibility(other, [str(zoo["a"]), str(zoo["b"])])


def test_check_reads_no_tensor_data(zoo, monkeypatch):
    def forbidden(self, name):
        raise AssertionError(f"tensor data of {name} was read")

    monkeypatch.setattr(TensorSource, "get", forbidden)
    report, _ = check_compatibility(zoo["base"], [str(zoo["root"] / "runs" / "*")])
    assert len(report.accepted) == 4
    assert report.base_names["bert.embeddings.word_embeddings.weight"] == "embeddings.word_embeddings.weight"


class Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def to_pickle(folder, extra=None):
    state = load_file(str(folder / "model.safetensors"))
    if extra is not None:
        state["evil"] = extra
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_are_refused_without_flag_and_safe_with_it(zoo, tmp_path):
    plain = to_pickle(copy_model(zoo["b"], tmp_path / "plain"))
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        TensorSource(plain)
    source = TensorSource(plain, allow_pickle=True)
    assert torch.equal(
        source.get("classifier.bias"), load_file(str(zoo["b"] / "model.safetensors"))["classifier.bias"]
    )

    marker = tmp_path / "pwned"
    evil = to_pickle(copy_model(zoo["c"], tmp_path / "evil"), Payload(str(marker)))
    report, _ = check_compatibility(zoo["base"], [str(zoo["a"]), str(plain), str(evil)], allow_pickle=True)
    assert sorted(c.id for c in report.accepted) == sorted([str(zoo["a"]), str(plain)])
    assert "weights_only" in report.rejected[0].reason
    assert not marker.exists()
