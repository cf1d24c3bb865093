"""PEFT LoRA candidates: exact soups of B·A products, checked against peft itself.

Two settings: LoRAs of a base that is already a classifier (no `modules_to_save`, so peft's own
`add_weighted_adapter(combination_type="cat")` can combine them), and `task_type=SEQ_CLS` LoRAs of a headless base,
whose heads are `modules_to_save`, fine-tuned on real reviews and scored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LABELS, fine_tune, tiny_config
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file
from test_hub import hub_env, run
from test_pipeline import manual_accuracy
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_soup import SoupConfig, cook
from hf_soup.errors import ConfigError
from hf_soup.pipeline.reproduce import reproduce

PEFT = "base_model.model."


def _lora(base_model, r, targets, seed, **options):
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **options)
    return get_peft_model(base_model, config)


@pytest.fixture(scope="module")
def headed(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A base that is a classifier, and three LoRAs with different ranks, targets and scalings (one rslora)."""
    root = tmp_path_factory.mktemp("lora_headed")
    torch.manual_seed(0)
    BertForSequenceClassification(tiny_config()).save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root / "base")
    specs = {
        "a": (2, ["query", "value"], {}),
        "b": (4, ["query", "key"], {}),
        "c": (4, ["value", "key"], {"use_rslora": True}),
    }
    for seed, (name, (r, targets, options)) in enumerate(specs.items()):
        model = BertForSequenceClassification.from_pretrained(root / "base")
        _lora(model, r, targets, seed, **options).save_pretrained(root / "runs" / name)
    return {"root": root, "base": root / "base", **{n: root / "runs" / n for n in specs}}


@pytest.fixture(scope="module")
def seq_cls(tmp_path_factory, zoo, reviews, tokenizer_dir) -> dict[str, Path]:
    """SEQ_CLS LoRAs (rank 4, query/value) of the zoo's headless BertModel, briefly fine-tuned on reviews."""
    root = tmp_path_factory.mktemp("lora_seq_cls")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    frame = pd.read_csv(reviews["train"])
    texts, labels = frame["review"].tolist(), [LABELS.index(s) for s in frame["score"]]
    paths = {"root": root, "base": zoo["base"]}
    for seed, (name, lr) in enumerate((("d", 3e-3), ("e", 2e-3), ("f", 4e-3))):
        torch.manual_seed(100)  # the same head initialisation for every run
        model = BertForSequenceClassification.from_pretrained(zoo["base"], num_labels=2)
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
        peft_model = get_peft_model(model, config)
        fine_tune(peft_model, tokenizer, texts, labels, lr, seed, steps=15)
        peft_model.save_pretrained(root / "runs" / name)
        paths[name] = root / "runs" / name
    return paths


def merged_state(base: Path, adapter: Path, num_labels: int = 2) -> dict[str, torch.Tensor]:
    """peft's own merge of one adapter into its base."""
    model = BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def uniform(tmp_path, base, candidates, **options):
    config = SoupConfig(
        base=str(base),
        candidates=[str(c) for c in candidates],
        recipe="uniform",
        output=str(tmp_path),
        **options,
    )
    return cook(config, quiet=True)


def max_difference(ours: dict, reference: dict) -> float:
    return max(float((ours[k].float() - reference[k].float()).abs().max()) for k in ours)


def test_merged_soup_equals_peft_cat_then_merge_and_unload(headed, tmp_path):
    result = uniform(tmp_path / "soup", headed["base"], [headed[n] for n in "abc"])
    assert result.report["compatibility"]["lora"] == [str(headed[n]) for n in "abc"]
    model = BertForSequenceClassification.from_pretrained(headed["base"])
    peft_model = PeftModel.from_pretrained(model, headed["a"], adapter_name="a")
    for name in "bc":
        peft_model.load_adapter(headed[name], adapter_name=name)
    peft_model.add_weighted_adapter(["a", "b", "c"], [1 / 3] * 3, "soup", combination_type="cat")
    peft_model.set_adapter("soup")
    reference = peft_model.merge_and_unload().state_dict()
    ours = load_file(str(tmp_path / "soup" / "model.safetensors"))
    assert set(ours) <= set(reference)
    assert max_difference(ours, reference) < 1e-5
    # The LoRAs did change something: the soup is not the base.
    base = load_file(str(headed["base"] / "model.safetensors"))
    assert max_difference({k: ours[k] for k in base}, base) > 1e-2


def test_naive_averaging_of_a_and_b_is_not_the_soup(headed, tmp_path):
    """The regression guard: (mean B)(mean A) differs from mean(B A), and hf-soup writes the latter."""
    uniform(tmp_path / "soup", headed["base"], [headed["b"], headed["c"]])  # both rank 4 on `key`
    ours = load_file(str(tmp_path / "soup" / "model.safetensors"))
    base = load_file(str(headed["base"] / "model.safetensors"))
    adapters = [load_file(str(headed[n] / "adapter_model.safetensors")) for n in "bc"]
    scales = [8 / 4, 8 / 4**0.5]  # lora_alpha / r, and lora_alpha / sqrt(r) for rslora
    module = "bert.encoder.layer.1.attention.self.key"
    a = [s[f"{PEFT}{module}.lora_A.weight"].double() for s in adapters]
    b = [scale * s[f"{PEFT}{module}.lora_B.weight"].double() for scale, s in zip(scales, adapters)]
    weight = base[f"{module}.weight"].double()
    exact = weight + (b[0] @ a[0] + b[1] @ a[1]) / 2
    naive = weight + ((b[0] + b[1]) / 2) @ ((a[0] + a[1]) / 2)
    written = ours[f"{module}.weight"].double()
    update = torch.linalg.norm(exact - weight)
    assert torch.linalg.norm(written - exact) / update < 1e-5
    assert torch.linalg.norm(naive - exact) / update > 0.3  # naive averaging is far off


def test_seq_cls_soup_is_the_average_of_merged_models_and_lora_output_matches(seq_cls, tmp_path):
    """With modules_to_save heads: merged soup = mean of peft's merges; the LoRA output (rank 4+4+4) loads in peft
    and merges to the same weights."""
    runs = [seq_cls[n] for n in "def"]
    uniform(tmp_path / "merged", seq_cls["base"], runs)
    merged = [merged_state(seq_cls["base"], r) for r in runs]
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    expected = {k: sum(m[k].double() for m in merged) / 3 for k in ours}
    assert max_difference(ours, expected) < 1e-5

    result = uniform(tmp_path / "adapter", seq_cls["base"], runs, output_kind="lora")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["r"] == 12 and written["lora_alpha"] == 12 and result.report["lora"]["rank"] == 12
    assert written["modules_to_save"] == ["classifier", "score"]
    assert result.report["lora"]["truncation"] is None
    assert max_difference(ours, merged_state(seq_cls["base"], tmp_path / "adapter")) < 1e-5
    assert not (tmp_path / "adapter" / "model.safetensors").exists()


def test_union_of_target_modules_and_rslora_in_the_lora_output(headed, tmp_path):
    """a: query/value r2; b: query/key r4; c: value/key r4 (rslora). Missing modules count as zero."""
    result = uniform(tmp_path / "adapter", headed["base"], [headed[n] for n in "abc"], output_kind="lora")
    uniform(tmp_path / "merged", headed["base"], [headed[n] for n in "abc"])
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    kinds = {m.rsplit(".", 1)[-1] for m in written["target_modules"]}
    assert kinds == {"query", "key", "value"}
    assert result.report["lora"]["rank"] == 8  # key: 4 + 4; query and value: 2 + 4, zero-padded to 8
    model = BertForSequenceClassification.from_pretrained(headed["base"])
    reloaded = PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload().state_dict()
    ours = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert max_difference(ours, reloaded) < 1e-5


def test_lora_rank_truncation_reports_the_frobenius_error(seq_cls, tmp_path):
    rank = 3
    runs = [seq_cls[n] for n in "def"]
    result = uniform(tmp_path / "adapter", seq_cls["base"], runs, output_kind="lora", lora_rank=rank)
    written = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    adapters = [load_file(str(r / "adapter_model.safetensors")) for r in runs]
    report = result.report["lora"]["truncation"]
    assert result.report["lora"]["rank"] == rank and report["rank"] == rank
    squared_error = squared_norm = 0.0
    for module, relative in report["modules"].items():
        exact = (
            sum(
                2.0
                * s[f"{PEFT}{module}.lora_B.weight"].double()
                @ s[f"{PEFT}{module}.lora_A.weight"].double()
                for s in adapters
            )
            / 3
        )
        approx = (
            written[f"{PEFT}{module}.lora_B.weight"].double()
            @ written[f"{PEFT}{module}.lora_A.weight"].double()
        )
        error = float(torch.linalg.norm(exact - approx))
        norm = float(torch.linalg.norm(exact))
        assert relative == pytest.approx(error / norm, rel=1e-4)
        singular = np.linalg.svd(exact.numpy(), compute_uv=False)  # Eckart-Young: the best rank-3 error
        assert relative == pytest.approx(np.sqrt(np.sum(singular[rank:] ** 2)) / norm, rel=1e-4)
        squared_error, squared_norm = squared_error + error**2, squared_norm + norm**2
    assert len(report["modules"]) == 4  # query and value in 2 layers
    assert report["overall"] == pytest.approx(np.sqrt(squared_error / squared_norm), rel=1e-4)
    assert 0 < report["overall"] < 1
    assert reproduce(
        str(tmp_path / "adapter"), quiet=True
    ).ok  # the adapter rebuilds bit-exactly from soup.json


def _adapter_copy(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def test_unsupported_adapters_are_rejected_with_the_reason(seq_cls, tmp_path):
    pot = tmp_path / "pot"
    for name in "de":
        shutil.copytree(seq_cls[name], pot / name)
    _adapter_copy(seq_cls["f"], pot / "dora", use_dora=True)
    _adapter_copy(seq_cls["f"], pot / "bias", lora_bias=True)
    other = _adapter_copy(seq_cls["f"], pot / "other-base", base_model_name_or_path="someone/else")
    # Garbage weights: a rejection that opened them would say "not a valid safetensors file" instead.
    (other / "adapter_model.safetensors").write_bytes(b"not weights at all")
    result = uniform(tmp_path / "soup", seq_cls["base"], [pot / "*"])
    reasons = {Path(r["id"]).name: r["reason"] for r in result.report["compatibility"]["rejected"]}
    assert set(reasons) == {"dora", "bias", "other-base"}
    assert "DoRA" in reasons["dora"] and "merge_and_unload" in reasons["dora"]
    assert "lora_bias" in reasons["bias"]
    assert "'someone/else'" in reasons["other-base"] and "not of --base" in reasons["other-base"]
    assert len(result.report["compatibility"]["accepted"]) == 2


def test_lora_and_full_candidates_mix_as_merged_models(seq_cls, tmp_path):
    full = tmp_path / "full"
    model = BertForSequenceClassification.from_pretrained(seq_cls["base"], num_labels=2)
    merged = PeftModel.from_pretrained(model, seq_cls["e"]).merge_and_unload()
    merged.save_pretrained(full)
    uniform(tmp_path / "soup", seq_cls["base"], [seq_cls["d"], full])
    ours = load_file(str(tmp_path / "soup" / "model.safetensors"))
    reference = merged_state(seq_cls["base"], seq_cls["d"])
    full_state = load_file(str(full / "model.safetensors"))
    expected = {k: (reference[k].double() + full_state[k].double()) / 2 for k in ours}
    assert max_difference(ours, expected) < 1e-5
    with pytest.raises(ConfigError, match="--output-kind lora needs every candidate to be a LoRA"):
        uniform(tmp_path / "adapter", seq_cls["base"], [seq_cls["d"], full], output_kind="lora")
    assert not (tmp_path / "adapter").exists()


def test_lora_candidates_are_scored_as_their_merged_models(seq_cls, reviews, tokenizer_dir, tmp_path):
    config = SoupConfig(
        base=str(seq_cls["base"]),
        candidates=[str(seq_cls[n]) for n in "def"],
        dataset=str(reviews["train"]),
        report_split=str(reviews["test"]),
        text_column="review",
        label_column="score",
        recipe="greedy",
        selection_fraction=0.25,
        max_length=64,
        bootstrap=100,
        output=str(tmp_path / "soup"),
    )
    result = cook(config, quiet=True)
    test = pd.read_csv(reviews["test"])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    labels = [LABELS.index(s) for s in test["score"]]
    for candidate in result.report["candidates"]:
        state = merged_state(seq_cls["base"], Path(candidate["id"]))
        expected = manual_accuracy(state, tmp_path / "soup", test["review"].tolist(), labels, tokenizer)
        assert candidate["report"]["test.csv"]["accuracy"] == pytest.approx(expected, abs=1e-9)


def test_hub_lora_of_another_base_is_rejected_before_its_weights_are_fetched(zoo, seq_cls, tmp_path):
    from hub_server import HubServer

    server = HubServer(tmp_path / "hub").start()
    try:
        server.upload_folder("org/base", zoo["base"])
        for name in "de":
            server.upload_folder(
                f"org/lora-{name}",
                _adapter_copy(seq_cls[name], tmp_path / name, base_model_name_or_path="org/base"),
            )
        server.upload_folder(
            "org/lora-other",
            _adapter_copy(seq_cls["f"], tmp_path / "other", base_model_name_or_path="someone/else"),
        )
        env = hub_env(server, tmp_path, token=None)
        cooked = run(
            [
                "--base",
                "org/base",
                "--candidates",
                "org/lora-*",
                "--recipe",
                "uniform",
                "--output",
                str(tmp_path / "soup"),
                "--format",
                "json",
                "--quiet",
            ],
            env,
        )
        assert cooked.returncode == 0, cooked.stderr
        report = json.loads(cooked.stdout)
        assert report["compatibility"]["rejected"][0]["id"] == "org/lora-other"
        assert "not of --base org/base" in report["compatibility"]["rejected"][0]["reason"]
        assert server.requests(contains="lora-other/resolve") and not [
            p for p in server.requests(contains="lora-other") if "adapter_model" in p
        ]
        assert [p for p in server.requests(contains="lora-d") if "adapter_model.safetensors" in p]
        ours = load_file(str(tmp_path / "soup" / "model.safetensors"))
        merged = [merged_state(seq_cls["base"], seq_cls[n]) for n in "de"]
        assert max_difference(ours, {k: (merged[0][k] + merged[1][k]) / 2 for k in ours}) < 1e-5
    finally:
        server.stop()


def test_lora_rank_needs_the_lora_output():
    with pytest.raises(ConfigError, match="only applies with --output-kind lora"):
        SoupConfig(base="b", candidates=["c"], recipe="uniform", lora_rank=4)
    with pytest.raises(ConfigError, match="R >= 1"):
        SoupConfig(base="b", candidates=["c"], recipe="uniform", output_kind="lora", lora_rank=0)


def test_an_adapter_with_nan_is_refused_without_merging_it(seq_cls, tmp_path):
    from safetensors.torch import save_file

    from hf_soup.errors import NonFiniteWeightsError

    bad = shutil.copytree(seq_cls["f"], tmp_path / "bad")
    state = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, str(bad / "adapter_model.safetensors"))
    with pytest.raises(NonFiniteWeightsError, match=f"NaN or Inf values in {key}"):
        uniform(tmp_path / "soup", seq_cls["base"], [seq_cls["d"], bad])
    assert not (tmp_path / "soup").exists()


def test_rank_and_alpha_patterns_are_merged_as_peft_merges_them(headed, tmp_path):
    """An adapter whose modules have their own ranks and alphas (peft's `rank_pattern` / `alpha_pattern`): hf-soup's
    merged model of it is peft's own `merge_and_unload` of it, module by module."""
    model = BertForSequenceClassification.from_pretrained(headed["base"])
    torch.manual_seed(7)
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["query", "value"],
        init_lora_weights=False,
        rank_pattern={"layer.0.attention.self.query": 4},
        alpha_pattern={"value": 1},
    )
    get_peft_model(model, config).save_pretrained(tmp_path / "patterned")
    saved = json.loads((tmp_path / "patterned" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["alpha_pattern"]  # the patterns are in the file hf-soup reads
    # A soup of it and a plain adapter: the mean of peft's two merged models.
    result = uniform(tmp_path / "soup", headed["base"], [tmp_path / "patterned", headed["a"]])
    assert sorted(result.report["compatibility"]["lora"]) == sorted(
        [str(tmp_path / "patterned"), str(headed["a"])]
    )
    assert len(result.mixture.ingredients) == 2  # both in the soup (none flagged by the shared-init check)
    ours = load_file(str(tmp_path / "soup" / "model.safetensors"))
    merged = [merged_state(headed["base"], tmp_path / "patterned"), merged_state(headed["base"], headed["a"])]
    # The adapted weights (the tiny base's classifier is not saved, so peft's loads draw their own heads).
    adapted = [name for name in ours if ".attention.self." in name]
    reference = {name: (merged[0][name].double() + merged[1][name].double()) / 2 for name in adapted}
    assert max_difference({name: ours[name] for name in adapted}, reference) < 1e-5
    # The patterns matter: read with the global lora_alpha alone, the merge would differ.
    plain = _adapter_copy(tmp_path / "patterned", tmp_path / "plain", alpha_pattern={})
    uniform(tmp_path / "soup-plain", headed["base"], [plain, headed["a"]])
    plain_soup = load_file(str(tmp_path / "soup-plain" / "model.safetensors"))
    assert max_difference({name: plain_soup[name] for name in adapted}, reference) > 1e-3


def test_an_adapter_whose_ranks_disagree_with_its_config_is_refused(headed, tmp_path):
    _adapter_copy(headed["b"], tmp_path / "pot" / "wrong-rank", r=8)  # its A tensors have rank 4
    result = uniform(
        tmp_path / "soup-wrong", headed["base"], [headed["a"], headed["c"], tmp_path / "pot" / "*"]
    )
    reasons = {Path(r["id"]).name: r["reason"] for r in result.report["compatibility"]["rejected"]}
    assert "has rank 4, but adapter_config.json gives it rank 8" in reasons["wrong-rank"]
