"""Lazy, per-tensor access to a checkpoint's weights, safetensors first.

Only tensor *headers* are read until a tensor is asked for, so checks stay cheap and soups stream. Each read opens
its file anew: `safe_open` memory-maps the whole file, and every page a read touches stays mapped into the process
for as long as the handle lives, so a handle kept open for a whole merge made resident memory grow with every byte
read from every input (8.4 GB to read four 1.1 B bf16 checkpoints, against 0.65 GB reopened; issue 22).
Pickle (`.bin`) weights are opened only when the caller allows it, and then with `weights_only=True`, which
refuses any payload that would run code.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub.constants import PYTORCH_WEIGHTS_NAME as WEIGHTS_NAME
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE as SAFE_WEIGHTS_INDEX_NAME
from huggingface_hub.constants import SAFETENSORS_SINGLE_FILE as SAFE_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open

from ..errors import CandidateFormatError, PickleRefusedError

# transformers' file names, from huggingface_hub: `import transformers` alone costs a plain merge most of a second.
WEIGHTS_INDEX_NAME = f"{WEIGHTS_NAME}.index.json"

# safetensors' dtype codes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    # Read, never averaged: unsigned ids and packed or quantized weights (float8 needs its scales to mean anything).
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# The dtypes a soup averages (in float32); every other tensor is copied (see `materialize.mix_tensor`).
AVERAGED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# Copied from the reference candidate even when candidates differ: position ids, BatchNorm's num_batches_tracked.
BUFFER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def averaged(dtype: torch.dtype) -> bool:
    """Whether tensors of `dtype` are averaged (float weights) or copied (ids, counters, quantized data)."""
    return dtype in AVERAGED_DTYPES


def non_finite(tensor: torch.Tensor) -> bool:
    """Whether a float tensor holds NaN or Inf. `aminmax` propagates NaN and shows ±Inf while reading the tensor
    once: several times faster than `isfinite(t).all()`, which writes a mask as large as the tensor."""
    return (
        averaged(tensor.dtype)
        and tensor.numel() > 0
        and not torch.stack(torch.aminmax(tensor)).isfinite().all()
    )


def find_weight_files(folder: Path) -> tuple[str, list[Path]]:
    """The weight files of a model folder and their format (`"safetensors"` or `"pickle"`).

    Raises:
        CandidateFormatError: the folder has no weights.
    """
    for index_name, single_name, fmt in (
        (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, "safetensors"),
        (WEIGHTS_INDEX_NAME, WEIGHTS_NAME, "pickle"),
    ):
        if (folder / index_name).is_file():
            index = json.loads((folder / index_name).read_text())
            shards = sorted(set(index["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CandidateFormatError(
                    f"{folder}: {index_name} lists shards that are missing ({', '.join(missing)}); "
                    "download the whole checkpoint again."
                )
            return fmt, [folder / s for s in shards]
        if (folder / single_name).is_file():
            return fmt, [folder / single_name]
    raise CandidateFormatError(
        f"{folder} has no model weights (expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}); "
        "point --candidates at folders written by `save_pretrained`."
    )


class TensorSource:
    """The tensors of one checkpoint, opened lazily and read one at a time.

    Args:
        folder (`Path`): a model folder (as written by `save_pretrained`).
        allow_pickle (`bool`, *optional*, defaults to `False`): accept `.bin` weights, read with
            `torch.load(weights_only=True)`.
        weights_name (`str`, *optional*): one safetensors file of the folder to open instead of the model's
            weights (a PEFT adapter's `adapter_model.safetensors`).
    """

    def __init__(self, folder: Path, allow_pickle: bool = False, weights_name: str | None = None):
        self.folder = Path(folder)
        if weights_name is not None:
            if not (self.folder / weights_name).is_file():
                raise CandidateFormatError(
                    f"{self.folder} has no {weights_name}; save the adapter with safetensors "
                    "(`model.save_pretrained(dir)`, the default)."
                )
            self.format, self.files = "safetensors", [self.folder / weights_name]
        else:
            self.format, self.files = find_weight_files(self.folder)
        self._where: dict[str, int] = {}
        self._handles: list = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.bytes_read = 0  # tensor bytes handed out by `get` and `rows` (`--profile` reports them)
        if self.format == "pickle" and not allow_pickle:
            raise PickleRefusedError(
                f"{self.folder} has only pickle weights ({self.files[0].name}), which can run code when loaded. "
                "Convert it to safetensors (`model.save_pretrained(dir)`), or pass --allow-pickle to load it "
                "with torch.load(weights_only=True)."
            )
        for shard_index, path in enumerate(self.files):
            handle = self._open(path)
            self._handles.append(None if self.format == "safetensors" else handle)
            for name in handle.keys():
                self._where[name] = shard_index

    def _open(self, path: Path):
        if self.format == "safetensors":
            try:
                handle = safe_open(str(path), framework="pt")
                for name in handle.keys():
                    view = handle.get_slice(name)
                    self._shapes[name] = tuple(view.get_shape())
                    stored = view.get_dtype()
                    if stored not in SAFETENSORS_DTYPES:
                        raise CandidateFormatError(
                            f"{path}: tensor {name} is stored as {stored}, which hf-soup cannot read; convert the "
                            "model to float32, float16 or bfloat16 weights first."
                        )
                    self._dtypes[name] = SAFETENSORS_DTYPES[stored]
                return handle
            except CandidateFormatError:
                raise
            except (SafetensorError, OSError, ValueError) as error:
                raise CandidateFormatError(
                    f"{path} is not a valid safetensors file ({error}); the download may be truncated: "
                    "fetch it again."
                ) from error
        try:
            # mmap keeps memory flat; weights_only refuses anything but tensors and plain containers.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
            raise CandidateFormatError(
                f"{path} could not be loaded with torch.load(weights_only=True): {str(error).splitlines()[0]}. "
                "Only plain tensor checkpoints are accepted; convert it to safetensors."
            ) from error
        for name, tensor in state.items():
            self._shapes[name] = tuple(tensor.shape)
            self._dtypes[name] = tensor.dtype
        return state

    @property
    def stored(self) -> TensorSource:
        """The tensors held in `files` (what `verify` checks for NaN/Inf): this checkpoint's own."""
        return self

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def get(self, name: str) -> torch.Tensor:
        if self.format == "safetensors":
            with safe_open(str(self.files[self._where[name]]), framework="pt") as handle:
                tensor = handle.get_tensor(name)  # maps its pages until the tensor is freed, no longer
        else:
            tensor = self._handles[self._where[name]][name]
        return self._counted(tensor)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` (along the first dimension) of one tensor, reading only those bytes."""
        if self.format == "safetensors":
            with safe_open(str(self.files[self._where[name]]), framework="pt") as handle:
                return self._counted(handle.get_slice(name)[start:stop])
        return self._counted(self._handles[self._where[name]][name][start:stop])

    def _counted(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._where:
            yield name, self.get(name)
