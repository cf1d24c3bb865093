"""Candidates whose embedding rows differ from the base's: matched by token string (`hf_soup/vocab.py`).

Hand-built: a tiny Llama (bf16, sharded, tied embeddings) with MiniLM's real 30522-token tokenizer; one fine-tune
adds a token (`add_tokens` + `resize_token_embeddings`) and numbers two tokens its own way (rows moved to match),
one pads its vocabulary to a multiple of 64. Every soup row
is compared with a float64 reference computed here from the candidates' own rows, looked up by token.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import run_main
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

ADDED = "<tool_call>"
EMBED = "model.embed_tokens.weight"


def noisy_copy(base: LlamaForCausalLM, seed: int) -> LlamaForCausalLM:
    model = LlamaForCausalLM(copy.deepcopy(base.config)).to(torch.bfloat16)  # resizing edits its config
    model.load_state_dict(base.state_dict())
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_((1e-2 * torch.randn(tensor.shape, generator=noise)).to(tensor.dtype))
    return model


@pytest.fixture(scope="module")
def family(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    paths = {name: root / name for name in ("base", "same", "added", "padded")}
    base.save_pretrained(paths["base"], max_shard_size="500KB")
    tokenizer.save_pretrained(paths["base"])
    noisy_copy(base, 1).save_pretrained(paths["same"], max_shard_size="500KB")
    added = noisy_copy(base, 2)
    grown = AutoTokenizer.from_pretrained(tokenizer_dir)
    grown.add_tokens([ADDED])
    added.resize_token_embeddings(len(grown), mean_resizing=False)
    good, bad = tokenizer.convert_tokens_to_ids(["good", "bad"])
    with torch.no_grad():
        table = added.get_input_embeddings().weight
        table[len(tokenizer)] = torch.linspace(-1, 1, 16)
        table[[good, bad]] = table[[bad, good]].clone()  # its own ids for two tokens, below: rows follow
    added.save_pretrained(paths["added"], max_shard_size="500KB")
    grown.save_pretrained(paths["added"])
    saved = json.loads((paths["added"] / "tokenizer.json").read_text())
    saved["model"]["vocab"]["good"], saved["model"]["vocab"]["bad"] = bad, good
    (paths["added"] / "tokenizer.json").write_text(json.dumps(saved))
    padded = noisy_copy(base, 3)
    padded.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    padded.save_pretrained(paths["padded"], max_shard_size="500KB")
    tokenizer.save_pretrained(paths["padded"])
    return paths


def rows_by_token(folder: Path, tokenizer_from: Path | None = None) -> tuple[torch.Tensor, dict[str, int]]:
    """The embedding table and the tokenizer's token -> id (`tokenizer_from` for a folder without one)."""
    table = None
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            if EMBED in handle.keys():
                table = handle.get_tensor(EMBED).double()
    return table, AutoTokenizer.from_pretrained(tokenizer_from or folder).get_vocab()


def soup(family, out: Path, *extra: str):
    candidates = [str(family[name]) for name in ("same", "added", "padded")]
    result = run_main(
        "--base",
        str(family["base"]),
        "--candidates",
        *candidates,
        "--recipe",
        "uniform",
        "--output",
        str(out),
        "--quiet",
        *extra,
    )
    assert result.returncode == 0, result.stderr
    return result


def expected_rows(family, tokens: list[str]) -> torch.Tensor:
    """The float64 mean, per token, over the candidates that have it."""
    tables = [
        rows_by_token(family[name], family["base"] if name == "same" else None)
        for name in ("same", "added", "padded")
    ]
    return torch.stack(
        [torch.stack([table[vocab[t]] for table, vocab in tables if t in vocab]).mean(0) for t in tokens]
    )


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            found.update({name: handle.get_tensor(name).double() for name in handle.keys()})
    return found


def distance_by_token(family, name: str) -> float:
    """‖θ − θ_base‖ / ‖θ_base‖, each embedding row taken from the candidate's row for the same token."""
    base, candidate = all_tensors(family["base"]), all_tensors(family[name])
    base_vocab = AutoTokenizer.from_pretrained(family["base"]).get_vocab()
    _, vocab = rows_by_token(family[name], family["base"] if name == "same" else None)
    order = sorted(base_vocab, key=base_vocab.get)
    candidate[EMBED] = candidate[EMBED][[vocab[t] for t in order]]
    squared = sum(float(((candidate[k] - base[k]) ** 2).sum()) for k in base)
    return (squared / sum(float((base[k] ** 2).sum()) for k in base)) ** 0.5


def assert_within_one_ulp(written: torch.Tensor, reference: torch.Tensor) -> None:
    _, exponent = torch.frexp(reference)
    ulp = torch.ldexp(torch.ones_like(reference), exponent - 8)  # bf16: 8 significant bits
    assert float(((written - reference).abs() / ulp).max()) <= 1.0


def test_by_default_the_soup_keeps_the_bases_vocabulary_and_names_the_dropped_token(family, tmp_path):
    result = soup(family, tmp_path / "soup")
    assert ADDED in result.stderr and "--vocab union" in result.stderr  # the warning names the dropped token
    base_vocab = AutoTokenizer.from_pretrained(family["base"]).get_vocab()
    tokens = sorted(base_vocab, key=base_vocab.get)
    written, vocab = rows_by_token(tmp_path / "soup")
    assert vocab == base_vocab and written.shape[0] == len(tokens)
    assert_within_one_ulp(written, expected_rows(family, tokens))
    config = json.loads((tmp_path / "soup" / "config.json").read_text())
    assert config["vocab_size"] == len(tokens) and config["tie_word_embeddings"] is True
    manifest = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert list(manifest["compatibility"]["vocab"]["dropped"].values()) == [[ADDED]]  # paths made relative
    distances = {Path(cid).name: value for cid, value in manifest["diagnostics"]["relative_distance"].items()}
    for name in ("same", "added", "padded"):  # distances to the base, embedding rows compared token by token
        assert distances[name] == pytest.approx(distance_by_token(family, name), rel=1e-9), name
    card = ModelCard.load(tmp_path / "soup" / "README.md")
    assert card.data.pipeline_tag == "text-generation"  # from the model class: a causal LM soup


def test_union_keeps_the_added_token_with_its_own_row(family, tmp_path):
    soup(family, tmp_path / "union", "--vocab", "union")
    written, vocab = rows_by_token(tmp_path / "union")
    base_vocab = AutoTokenizer.from_pretrained(family["base"]).get_vocab()
    assert vocab[ADDED] == len(base_vocab) and written.shape[0] == len(base_vocab) + 1
    tokens = sorted(vocab, key=vocab.get)
    assert_within_one_ulp(written, expected_rows(family, tokens))  # the added row: its one owner's row
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "union"
    )  # plain transformers loads it, still tied
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.config.vocab_size == len(vocab)


def test_a_tokenizer_that_is_not_the_bases_is_refused(family, tokenizer_dir, tmp_path):
    other = tmp_path / "other"
    LlamaForCausalLM.from_pretrained(family["same"]).save_pretrained(other)
    tokenizer = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    for token in [t for t in vocab if t.isalpha()][:400]:  # 1.3% of the base's tokens renamed
        vocab[f"zz{token}"] = vocab.pop(token)
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    for name in ("tokenizer_config.json",):
        (other / name).write_text((family["base"] / name).read_text())
    result = run_main(
        "check",
        "--base",
        str(family["base"]),
        "--candidates",
        str(family["same"]),
        str(other),
        "--format",
        "json",
        "--quiet",
    )
    report = json.loads(result.stdout)
    (rejected,) = report["rejected"]
    assert rejected["id"] == str(other) and "lacks 400 of its 30522 tokens" in rejected["reason"]


def task_vector_rows(family, recipe: str, tokens: list[str]) -> torch.Tensor:
    """Plain float64 task arithmetic (λ = 1, every weight 0.5, not normalised) or TIES (density 1: the sign
    election and the disjoint mean), per token, over the candidates' rows looked up by token; a token the base
    lacks gets the mean of its owners' rows."""
    base, base_vocab = rows_by_token(family["base"])
    tables = [
        rows_by_token(family[name], family["base"] if name == "same" else None)
        for name in ("same", "added", "padded")
    ]
    rows = []
    for token in tokens:
        owners = [table[vocab[token]] for table, vocab in tables if token in vocab]
        if token not in base_vocab:
            rows.append(torch.stack(owners).mean(0))
            continue
        deltas = torch.stack(owners) - base[base_vocab[token]]
        if recipe == "task_arithmetic":
            rows.append(base[base_vocab[token]] + 0.5 * deltas.sum(0))
            continue
        elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
        agrees = (torch.sign(deltas) == elected).double()
        count = agrees.sum(0)
        rows.append(base[base_vocab[token]] + (deltas * agrees).sum(0) / torch.where(count == 0, 1.0, count))
    return torch.stack(rows)


@pytest.mark.parametrize("recipe", ["task_arithmetic", "ties"])
def test_mergekit_methods_merge_embedding_rows_by_token(family, tmp_path, recipe):
    """Task vectors of an embedding are taken token by token (a candidate's own ids, a padded table), and a token
    the base lacks (`--vocab union`) has no task vector: its row is its owner's, not its weight times it."""
    out = tmp_path / recipe
    candidates = [str(family[name]) for name in ("same", "added", "padded")]
    result = run_main(
        "--base", str(family["base"]), "--candidates", *candidates, "--recipe", recipe, "--vocab", "union",
        "--weights", "0.5", "--output", str(out), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written, vocab = rows_by_token(out)
    tokens = sorted(vocab, key=vocab.get)
    assert ADDED in vocab
    assert_within_one_ulp(written, task_vector_rows(family, recipe, tokens))
