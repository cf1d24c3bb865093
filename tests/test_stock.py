"""Model Stock (`--recipe stock`): the written soup equals an independent plain-torch implementation on the state
dicts (to 1e-6), the per-tensor ratios are recorded, it runs without data and with it, and it reproduces."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import run_main, tiny_config
from safetensors.torch import load_file
from transformers import BertForSequenceClassification, BertModel

from hf_soup import cook
from hf_soup.pipeline.reproduce import reproduce
from hf_soup.recipes.stock import interpolation_ratio


@pytest.fixture(scope="module")
def family(tmp_path_factory, tokenizer_dir):
    """A base and three fine-tunes whose task vectors share a direction (cosines around 0.5) plus their own noise."""
    root = tmp_path_factory.mktemp("stock")
    config = tiny_config()
    torch.manual_seed(0)
    base = BertModel(config, add_pooling_layer=True)
    base.save_pretrained(root / "base")
    shutil.copytree(tokenizer_dir, root / "base", dirs_exist_ok=True)
    torch.manual_seed(1)
    start = BertForSequenceClassification(config)
    start.bert.load_state_dict(base.state_dict())
    shared = torch.Generator().manual_seed(100)
    direction = {k: torch.randn(v.shape, generator=shared) for k, v in start.state_dict().items()}
    for seed, name in enumerate("abc", start=10):
        noise = torch.Generator().manual_seed(seed)
        state = {
            k: v + 0.01 * (direction[k] + torch.randn(v.shape, generator=noise))
            if v.is_floating_point()
            else v
            for k, v in start.state_dict().items()
        }
        model = BertForSequenceClassification(config)
        model.load_state_dict(state)
        model.save_pretrained(root / "runs" / name)
    return root


def reference_stock(base: dict, candidates: list[dict]) -> tuple[dict, dict]:
    """Model Stock on state dicts, in float64: per tensor the base has, t from the mean pairwise cosine of the
    task vectors; tensors the base lacks are averaged. Returns (soup, t per tensor)."""
    n = len(candidates)
    soup, ratios = {}, {}
    for name in candidates[0]:
        tensors = [c[name].double() for c in candidates]
        base_name = name.removeprefix("bert.")
        if base_name not in base:  # the task head
            soup[name] = sum(tensors) / n
            continue
        anchor = base[base_name].double()
        offsets = [(t - anchor).reshape(-1) for t in tensors]
        pairs = [
            float(offsets[i] @ offsets[j] / (offsets[i].norm() * offsets[j].norm()))
            for i in range(n)
            for j in range(i + 1, n)
        ]
        cos = sum(pairs) / len(pairs)
        t = min(1.0, max(0.0, n * cos / (1 + (n - 1) * cos)))
        ratios[name] = t
        soup[name] = t * (sum(tensors) / n) + (1 - t) * anchor
    return soup, ratios


def test_stock_matches_an_independent_implementation_without_data(family, tmp_path):
    runs = [family / "runs" / k for k in "abc"]
    result = run_main(
        "--base",
        str(family / "base"),
        "--candidates",
        *map(str, runs),
        "--recipe",
        "stock",
        "--output",
        str(tmp_path / "soup"),
        "--quiet",
    )
    assert result.returncode == 0, result.stderr
    written = load_file(str(tmp_path / "soup" / "model.safetensors"))
    base = load_file(str(family / "base" / "model.safetensors"))
    expected, ratios = reference_stock(base, [load_file(str(r / "model.safetensors")) for r in runs])
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name].double(), tensor, rtol=0, atol=1e-6)
    manifest = json.loads((tmp_path / "soup" / "soup.json").read_text())
    stock = manifest["stock"]
    assert stock["n"] == 3 and set(stock["t"]) == set(ratios)
    assert all(math.isclose(stock["t"][k], ratios[k], abs_tol=1e-9) for k in ratios)
    assert 0.3 < stock["summary"]["t_median"] < 0.95  # the shared direction: neither the base nor the average
    assert manifest["recipe"]["reference_url"] == "https://arxiv.org/abs/2403.19522"
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "[Jang et al. 2024, *Model Stock*](https://arxiv.org/abs/2403.19522)" in card
    assert "### Model Stock" in card and f"median {stock['summary']['t_median']:.4f}" in card
    assert reproduce(str(tmp_path / "soup"), quiet=True).ok


def test_interpolation_ratio():
    assert interpolation_ratio(1.0, 5) == 1.0  # identical directions: the average
    assert (
        interpolation_ratio(0.0, 5) == 0.0 and interpolation_ratio(-0.2, 5) == 0.0
    )  # no agreement: the base
    assert interpolation_ratio(0.5, 2) == pytest.approx(2 * 0.5 / 1.5)  # the paper's N = 2 case
    assert interpolation_ratio(0.2, 10) == pytest.approx(2 / 2.8)


def test_stock_with_data_is_reported_against_the_best_individual(family, tmp_path, reviews):
    result = cook(
        base=str(family / "base"),
        candidates=[str(family / "runs" / "*")],
        dataset=str(reviews["train"]),
        report_split=str(reviews["test"]),
        text_column="review",
        label_column="score",
        recipe="stock",
        max_eval_examples=64,
        quiet=True,
    )
    summary = result.summary
    assert summary.recipe.name == "stock" and summary.soup.name == "stock soup"
    assert summary.comparisons["test.csv"]["soup"]["accuracy"].delta == pytest.approx(
        summary.soup.report["test.csv"]["accuracy"] - summary.best_individual.report["test.csv"]["accuracy"]
    )
    for name, weights in result.mixture.per_tensor_weights.items():
        assert sum(weights.values()) == pytest.approx(1.0), name


def test_stock_needs_two_fine_tunes(family, tmp_path):
    result = run_main(
        "--base",
        str(family / "base"),
        "--candidates",
        str(family / "runs" / "a"),
        "--recipe",
        "stock",
        "--output",
        str(tmp_path / "soup"),
        "--quiet",
    )
    assert result.returncode != 0 and not (tmp_path / "soup").exists()
    assert "error:" in result.stderr
