"""A GGUF checkpoint as a plain transformers folder (safetensors weights, config, tokenizer): a base to fine-tune
and to soup.

transformers reads GGUF files itself (`from_pretrained(folder, gguf_file=...)`, with the `gguf` package) and
dequantizes every tensor to float while loading. The model it returns still carries the GGUF quantizer's state, so
`save_pretrained` refuses it ("quantized with gguf and is not serializable"); that state is removed here with the
quantizer's own `remove_quantization_config`, and the folder written is an ordinary unquantized model that loads
without `gguf`. The values are the dequantized ones: a Q4 file stays a 4-bit model's weights, only stored as floats.

    hf-soup convert-gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf --output ./smollm2-135m
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import CandidateFormatError, ConfigError
from .folders import atomic_folder

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def convert_gguf(
    gguf_path: str | Path, output: str | Path, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Write the GGUF file `gguf_path` as a transformers folder at `output`; return `output`.

    Args:
        gguf_path (`str` or `Path`): a `.gguf` file (a model transformers can read from GGUF: Llama, Mistral,
            Qwen2, ...).
        output (`str` or `Path`): the folder to write (atomically: nothing is left behind on failure).
        dtype (`str`, *optional*, defaults to `"float32"`): how the dequantized weights are stored. `float32`
            keeps them exactly; `bfloat16` halves the size and rounds them.
        overwrite (`bool`, *optional*): replace an existing `output`.

    Raises:
        ConfigError: not a `.gguf` file, an unknown dtype, or the `gguf` package is missing.
        CandidateFormatError: transformers cannot read this GGUF file.
    """
    path = Path(gguf_path)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if path.suffix != ".gguf" or not path.is_file():
        raise ConfigError(f"{path} is not a .gguf file; pass the path of the GGUF file itself.")
    try:
        import gguf  # noqa: F401 (transformers reads GGUF through it)
    except ImportError as error:
        raise ConfigError("Reading GGUF files needs the gguf package: pip install gguf") from error
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as error:
        raise CandidateFormatError(
            f"transformers cannot read {path}: {str(error).splitlines()[0]}"
        ) from error
    quantizer = getattr(model, "hf_quantizer", None)
    if (
        quantizer is not None
    ):  # the weights are already dequantized floats; only the quantizer's state remains
        quantizer.remove_quantization_config(model)
    model = model.to(getattr(torch, dtype))
    with atomic_folder(Path(output), overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    logger.info("Wrote %s (%s, %s) to %s", type(model).__name__, dtype, path.name, output)
    return Path(output)
