"""Learned soups: streamed ∂L/∂α against an all-in-memory autograd reference, and never worse than the start."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import config_for
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_soup import cook
from hf_soup.candidates.compat import check_compatibility
from hf_soup.evaluation.data import load_data
from hf_soup.evaluation.tasks import task_spec
from hf_soup.evaluation.text import encode_text_split
from hf_soup.merge.materialize import Workbench
from hf_soup.recipes import LearnedOptions
from hf_soup.scoring.mixing import MixingTrainer

CANDIDATES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def setup(zoo, reviews):
    report, sources = check_compatibility(zoo["base"], [str(zoo[c]) for c in CANDIDATES])
    spec = task_spec(None, str(reviews["train"]), text_column="review", label_column="score")
    data = load_data(str(reviews["train"]), split="train").select(range(40))
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    split = encode_text_split(
        "selection", data, spec, tokenizer, model_labels=report.label_names, num_labels=2, max_length=48
    )
    return report, sources, split, DataCollatorWithPadding(tokenizer)


def reference_alpha(zoo, split, collator, granularity, options: LearnedOptions):
    """The paper's learned soup: every model in memory, autograd through θ(α) = Σ α_i θ_i."""
    states = [load_file(str(zoo[c] / "model.safetensors")) for c in CANDIDATES]
    model = AutoModelForSequenceClassification.from_pretrained(zoo["a"]).eval()
    names = [n for n, _ in model.named_parameters()]
    groups = 1 if granularity == "model" else len(names)
    z = torch.zeros(groups, len(states), dtype=torch.float64, requires_grad=True)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([z, log_t], lr=options.lr)
    generator = torch.Generator().manual_seed(options.seed)
    for _ in range(options.epochs):
        order = torch.randperm(len(split), generator=generator).numpy()
        for start in range(0, len(order), options.batch_size):
            indices = order[start : start + options.batch_size]
            alpha = torch.softmax(z, dim=1)
            params = {
                name: sum(alpha[0 if groups == 1 else k, i].float() * s[name] for i, s in enumerate(states))
                for k, name in enumerate(names)
            }
            batch = collator([split.features[i] for i in indices])
            logits = torch.func.functional_call(model, params, kwargs=dict(batch)).logits
            loss = torch.nn.functional.cross_entropy(
                logits * log_t.exp(), torch.as_tensor(split.labels[indices])
            )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    alpha = torch.softmax(z, dim=1).detach().numpy()
    return ({"*": alpha[0]} if groups == 1 else dict(zip(names, alpha))), float(log_t.detach().exp())


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_streamed_gradients_match_an_all_in_memory_reference(setup, zoo, granularity):
    report, sources, split, collator = setup
    model = AutoModelForSequenceClassification.from_pretrained(zoo["a"], dtype=torch.float32)
    options = LearnedOptions(granularity=granularity, epochs=2, lr=0.2, batch_size=16, seed=3)
    spec = task_spec(None, "reviews.csv", text_column="review", label_column="score")
    trainer = MixingTrainer(Workbench(model, sources), split, collator, spec, options, quiet=True)
    ids = [c.id for c in report.accepted]
    assert ids == [str(zoo[c]) for c in CANDIDATES]
    _, _, state = trainer.learn(ids, lambda mixture, bar: 0.0)
    expected_alpha, expected_temperature = reference_alpha(zoo, split, collator, granularity, options)
    assert len(state.losses) == 2 * 3  # 40 examples, batches of 16, 2 epochs
    assert sorted(state.groups) == sorted(expected_alpha)
    assert np.abs(state.final_alpha - 0.25).max() > 1e-3  # it really moved
    for group, row in zip(state.groups, state.final_alpha):
        np.testing.assert_allclose(row, expected_alpha[group], atol=2e-5, err_msg=group)
    assert state.temperature == pytest.approx(expected_temperature, abs=2e-5)


@pytest.fixture(scope="module")
def learned_run(zoo, reviews, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learned")
    config = config_for(
        zoo,
        reviews,
        tmp,
        recipe="learned",
        granularity="model",
        learn_epochs=3,
        learn_lr=0.3,
        selection_metric="loss",
        cache_dir=str(tmp / "cache"),
    )
    return cook(config, quiet=True)


def test_learned_soup_never_scores_below_its_uniform_start(learned_run):
    report = learned_run.report
    start, *epochs = report["trajectory"]
    assert start["action"] == "start" and len(epochs) == 3
    kept = max(step["score"] for step in report["trajectory"])
    assert -report["soup"]["selection_loss"] == pytest.approx(kept)
    assert kept >= start["score"]
    assert report["soup"]["selection_loss"] <= report["uniform"]["selection_loss"] + 1e-6
    assert -report["uniform"]["selection_loss"] == pytest.approx(start["score"])


def test_manifest_records_alpha_and_temperature_and_the_weights_follow_them(learned_run, zoo):
    manifest = json.loads((learned_run.output / "soup.json").read_text())
    alpha = manifest["learned"]["alpha"]["*"]
    assert sum(alpha.values()) == pytest.approx(1.0)
    assert manifest["learned"]["temperature"] > 0
    weights = {i["id"]: i["weight"] for i in manifest["mixture"]["ingredients"]}
    assert weights == pytest.approx(alpha)
    soup = load_file(str(learned_run.output / "model.safetensors"))
    # Local ingredients are named relative to the soup folder in its manifest.
    states = {cid: load_file(str(learned_run.output / cid / "model.safetensors")) for cid in alpha}
    for name, tensor in soup.items():
        expected = sum(alpha[cid] * states[cid][name].double() for cid in alpha)
        torch.testing.assert_close(tensor.double(), expected, atol=1e-6, rtol=0)
