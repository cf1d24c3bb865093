"""Causal-LM soups scored by held-out token NLL (`--task causal-lm`, `hf_soup/language_modeling.py`).

A tiny Llama (bf16, sharded, tied embeddings, MiniLM's real tokenizer) is trained briefly on real fine-food reviews
(the shared start) and fine-tuned once; the three candidates are that fine-tune plus seeded noise of three sizes,
so their ranking is built, not trained. Every number hf-soup reports is checked against an independent
computation: transformers' own `labels=` loss per document, a softmax over full vocabularies for the ensemble, a
plain loop for the bootstrap, and a full evaluation for each early-rejection decision.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_main
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_soup.evaluation.language_modeling import encode_document_split, ensemble_token_nll, pad_documents
from hf_soup.evaluation.stats import bootstrap_indices, compare_documents
from hf_soup.evaluation.tasks import task_spec
from hf_soup.scoring.scorer import (
    RejectionBound,
    logits_unless_hopeless,
    model_outputs,
    predict,
    score_logits,
)

MAX_LENGTH = 24
# The candidates: one real fine-tune of the base, plus seeded Gaussian noise of this many times each weight
# matrix's own standard deviation. Noise raises the NLL by about 1.2·σ² nats here (0.01, 0.1, 0.4), so the ranking
# ft-a < ft-b < ft-c, and the best individual, are facts of the construction, decided by ~0.1 nat on any CPU.
RUNS = {"ft-a": 0.1, "ft-b": 0.3, "ft-c": 0.6}


def train(model, tokenizer, texts: list[str], lr: float, seed: int, steps: int) -> None:
    """A few steps of next-token training (float32 master weights), in place."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(texts), (8,), generator=generator).tolist()
        batch = tokenizer(
            [texts[i] for i in rows],
            truncation=True,
            max_length=MAX_LENGTH,
            padding=True,
            return_tensors="pt",
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        ).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory, tokenizer_dir, reviews) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("causal")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = pd.read_csv(reviews["train"])["review"].tolist()
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    train(base, tokenizer, texts[:200], 1e-2, 0, steps=40)
    paths = {"base": root / "base"}
    base.to(torch.bfloat16).save_pretrained(paths["base"], max_shard_size="1MB")
    tokenizer.save_pretrained(paths["base"])
    tuned = LlamaForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    train(tuned, tokenizer, texts[200:300], 3e-3, 1, steps=12)
    for seed, (name, scale) in enumerate(RUNS.items()):
        generator = torch.Generator().manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.load_state_dict(
            {
                key: value + scale * value.std() * torch.randn(value.shape, generator=generator)
                if value.dim() > 1
                else value
                for key, value in tuned.state_dict().items()
            }
        )
        paths[name] = root / name
        model.to(torch.bfloat16).save_pretrained(paths[name], max_shard_size="1MB")
    data = pd.read_csv(reviews["test"])
    for name, rows in (("selection", data[:40]), ("report", data[40:80])):
        paths[name] = root / f"{name}.csv"
        rows.to_csv(paths[name], index=False)
    return paths


def document_losses(folder: Path, csv: Path, tokenizer_dir: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Each document's mean token NLL over its first MAX_LENGTH tokens and its predicted tokens, from
    transformers' own `labels=` loss, one document at a time (no padding, no batching); and how many documents
    were longer."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    losses, tokens, longer = [], [], 0
    for text in pd.read_csv(csv)["review"]:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        longer += ids.shape[1] > MAX_LENGTH
        ids = ids[:, :MAX_LENGTH]
        with torch.no_grad():
            losses.append(float(model(input_ids=ids, labels=ids).loss))
        tokens.append(ids.shape[1] - 1)
    return np.asarray(losses), np.asarray(tokens), longer


def corpus_nll(losses: np.ndarray, tokens: np.ndarray) -> float:
    return float((losses * tokens).sum() / tokens.sum())


def test_token_nll_matches_transformers_loss(family, tokenizer_dir):
    spec = task_spec("causal-lm", str(family["selection"]), text_column="review")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = pd.read_csv(family["selection"])
    from datasets import Dataset

    split = encode_document_split("selection", Dataset.from_pandas(data), spec, tokenizer, MAX_LENGTH)
    model = AutoModelForCausalLM.from_pretrained(family["ft-b"], dtype=torch.bfloat16).eval()
    token_losses = predict(model, split, pad_documents, 7, True, model_outputs(spec, split))
    expected, tokens, longer = document_losses(family["ft-b"], family["selection"], tokenizer_dir)
    assert (split.labels == tokens).all()
    assert split.truncated == longer > 0  # some reviews were cut
    per_document = token_losses.sum(axis=1) / tokens
    np.testing.assert_allclose(per_document, expected, rtol=2e-3)  # batched and padded vs one by one, in bf16
    score = score_logits(token_losses, split, spec)
    assert score.loss == pytest.approx(corpus_nll(expected, tokens), rel=2e-3)
    assert score.metrics["perplexity"] == pytest.approx(np.exp(corpus_nll(expected, tokens)), rel=2e-3)


def test_ensemble_averages_probabilities(family, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer("The coffee was fresh and the price was fair.", return_tensors="pt")["input_ids"]
    members, probabilities = [], []
    for name in ("ft-a", "ft-c"):
        model = AutoModelForCausalLM.from_pretrained(family[name], dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        members.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").numpy()[None])
        probabilities.append(torch.softmax(logits, dim=-1))
    mean = torch.stack(probabilities).mean(0)  # full next-token distributions, averaged
    expected = -torch.log(mean[torch.arange(len(mean)), ids[0, 1:]]).numpy()
    np.testing.assert_allclose(ensemble_token_nll(members)[0], expected, rtol=1e-5)


def test_paired_bootstrap_resamples_documents():
    generator = np.random.default_rng(5)
    tokens = generator.integers(1, 60, size=50)
    a, b = tokens * generator.uniform(2, 4, 50), tokens * generator.uniform(2, 4, 50)
    result = compare_documents(tokens, a, b, resamples=200, seed=3)
    diffs = {"nll": [], "perplexity": []}
    for rows in bootstrap_indices(50, 200, 3):  # a plain loop over the same resamples
        nll_a, nll_b = a[rows].sum() / tokens[rows].sum(), b[rows].sum() / tokens[rows].sum()
        diffs["nll"].append(nll_a - nll_b)
        diffs["perplexity"].append(np.exp(nll_a) - np.exp(nll_b))
    for metric, values in diffs.items():
        low, high = np.percentile(values, [2.5, 97.5])
        assert result[metric]["low"] == pytest.approx(low) and result[metric]["high"] == pytest.approx(high)
    assert result["nll"]["delta"] == pytest.approx(a.sum() / tokens.sum() - b.sum() / tokens.sum())


def test_early_rejection_on_loss_decides_as_a_full_evaluation():
    spec = task_spec("causal-lm", "reviews.csv", text_column="review")
    generator = np.random.default_rng(0)
    tokens = generator.integers(1, 30, size=64)
    token_losses = np.zeros((64, 30), dtype=np.float32)
    for row, count in enumerate(tokens):
        token_losses[row, :count] = generator.gamma(2.0, 2.0, count)
    from hf_soup.evaluation.splits import EncodedSplit

    split = EncodedSplit("selection", [{}] * 64, tokens, np.argsort(-tokens), "")
    full = score_logits(token_losses, split, spec).loss
    order = split.order
    batches = [(order[i : i + 8], token_losses[order[i : i + 8]]) for i in range(0, 64, 8)]
    stopped = 0
    for bar in np.linspace(full * 0.5, full * 1.5, 41):  # the trial must reach mean NLL <= bar
        kept, seen = logits_unless_hopeless(iter(batches), split, spec, "loss", -bar)
        assert (kept is not None) == (full <= bar * (1 + 1e-9))
        stopped += seen < 64
    assert stopped > 0  # some trials were abandoned before the end
    assert RejectionBound("loss", 64, -full, weight=float(tokens.sum())).budget >= token_losses.sum()


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "soup.json").read_text())


def cli(family, out: Path, recipe: str, *extra: str):
    result = run_main(
        "--base",
        str(family["base"]),
        "--candidates",
        *(str(family[n]) for n in RUNS),
        "--task",
        "causal-lm",
        "--dataset",
        str(family["selection"]),
        "--text-column",
        "review",
        "--selection-split",
        str(family["selection"]),
        "--report-split",
        str(family["report"]),
        "--max-length",
        str(MAX_LENGTH),
        "--recipe",
        recipe,
        "--output",
        str(out),
        "--bootstrap",
        "200",
        *extra,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_greedy_causal_lm_soup_end_to_end(family, tokenizer_dir, tmp_path):
    out = tmp_path / "soup"
    result = cli(family, out, "greedy", "--max-shard-size", "1MB")
    summary = read_manifest(out)
    selection = {
        n: corpus_nll(*document_losses(family[n], family["selection"], tokenizer_dir)[:2]) for n in RUNS
    }
    assert selection["ft-b"] - selection["ft-a"] > 2e-2 and selection["ft-c"] - selection["ft-b"] > 2e-2
    assert (
        Path(summary["best_individual"]["id"]).name == "ft-a"
    )  # by construction (RUNS), by far more than rounding
    for row in summary["candidates"]:
        name = Path(row["id"]).name
        assert row["selection_loss"] == pytest.approx(selection[name], rel=2e-3)
    report_losses, report_tokens, _ = document_losses(out, family["report"], tokenizer_dir)
    report = summary["soup"]["report"]["report.csv"]
    assert report["perplexity"] == pytest.approx(np.exp(corpus_nll(report_losses, report_tokens)), rel=2e-3)
    comparison = summary["comparisons"]["report.csv"]["soup"]
    assert set(comparison) == {"perplexity", "nll"} and comparison["nll"]["low"] <= comparison["nll"]["high"]
    assert summary["task"]["name"] == "causal-lm"
    assert any(
        "truncated to --max-length 24 tokens, not packed" in note for note in summary["splits"]["notes"]
    )
    assert "lower is better" in result.stdout and "points of perplexity" not in result.stdout
    assert "ensemble of all 3 candidates (probabilities)" in result.stdout
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.eval_results[0].metric_type == "perplexity"
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1 and "lm_head.weight" not in weight_map  # sharded, still tied
    reproduced = run_main("reproduce", str(out), "--quiet")  # rebuilt from soup.json, every tensor checked
    assert reproduced.returncode == 0, reproduced.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["pruned", "learned", "wise", "stock", "auto"])
def test_every_recipe_scores_causal_lms(family, tokenizer_dir, tmp_path, recipe):
    out = tmp_path / recipe
    cli(family, out, recipe, *(("--learn-epochs", "1") if recipe in ("learned", "auto") else ()))
    summary = read_manifest(out)
    assert summary["recipe"]["name"] == recipe
    soup = summary["soup"]["selection_loss"]
    start = {"pruned": summary["uniform"], "learned": summary["uniform"], "wise": summary["best_individual"]}
    if recipe in start:  # chosen on the selection split's NLL: never worse than where the recipe starts
        assert soup <= start[recipe]["selection_loss"] + 1e-9
    if recipe == "learned":
        assert summary["learned"]["step_losses"]  # gradient steps on the token NLL were taken
    # The soup is scored as it is written: its report NLL, computed here from the folder one document at a time.
    losses, tokens, _ = document_losses(out, family["report"], tokenizer_dir)
    assert summary["soup"]["report"]["report.csv"]["nll"] == pytest.approx(
        corpus_nll(losses, tokens), rel=2e-3
    )


def test_a_candidate_with_an_added_token_is_scored_and_souped_in_the_union_vocabulary(
    family, tokenizer_dir, tmp_path
):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens(["<review>"])
    grown = LlamaForCausalLM.from_pretrained(family["ft-c"], dtype=torch.bfloat16)
    grown.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        grown.get_input_embeddings().weight[-1] = torch.linspace(-0.5, 0.5, 32)
    grown.save_pretrained(tmp_path / "ft-grown", max_shard_size="1MB")
    tokenizer.save_pretrained(tmp_path / "ft-grown")
    out = tmp_path / "soup"
    result = run_main(
        "--base",
        str(family["base"]),
        "--candidates",
        str(family["ft-a"]),
        str(family["ft-b"]),
        str(tmp_path / "ft-grown"),
        "--task",
        "causal-lm",
        "--dataset",
        str(family["selection"]),
        "--text-column",
        "review",
        "--selection-split",
        str(family["selection"]),
        "--report-split",
        str(family["report"]),
        "--max-length",
        str(MAX_LENGTH),
        "--recipe",
        "uniform",
        "--vocab",
        "union",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    tables = [
        AutoModelForCausalLM.from_pretrained(p, dtype=torch.bfloat16).get_input_embeddings().weight.double()
        for p in (family["ft-a"], family["ft-b"], tmp_path / "ft-grown")
    ]
    soup = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    written = soup.get_input_embeddings().weight.double()
    assert written.shape[0] == len(tokenizer) and soup.config.tie_word_embeddings
    shared = torch.stack([tables[0], tables[1], tables[2][:-1]]).mean(0)  # tokens all three have
    expected = torch.cat([shared, tables[2][-1:]])  # the added token: its only owner's row
    _, exponent = torch.frexp(expected)
    ulp = torch.ldexp(torch.ones_like(expected), exponent - 8)  # bf16: 8 significant bits
    assert float(((written - expected).abs() / ulp).max()) <= 1.0  # the float64 per-token mean, in bf16
    losses, tokens, _ = document_losses(out, family["report"], tokenizer_dir)
    report = json.loads((out / "soup.json").read_text())["soup"]["report"]["report.csv"]
    assert report["nll"] == pytest.approx(corpus_nll(losses, tokens), rel=2e-3)  # scored as written
