"""A safetensors file written tensor by tensor, so that a shard is never held in memory whole.

`safetensors.torch.save_file` takes a dict of every tensor of a file: at LLM scale that is one whole shard (up to
`--max-shard-size`, 5 GB by default on the Hub) of anonymous memory, on top of whatever is being averaged. The
format needs no such thing (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
length, a JSON header with each tensor's dtype, shape and byte range, then the bytes. Every shape and dtype is
known before the first tensor is mixed (`materialize.plan_output`), so the header is written first and each tensor
is appended as soon as it exists, then freed. Tensors are laid out widest dtype first (stable otherwise), so each
starts at a multiple of its element size, as in `save_file`'s files; `safe_open`, `load_file` and `from_pretrained`
read the same tensors, bytes and metadata as from `save_file` (tested).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .weights import SAFETENSORS_DTYPES

_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


class SafetensorsStreamWriter:
    """Writes `planned` tensors (name -> a `meta` tensor with the shape and dtype to write) in `order`.

    ```python
    >>> with SafetensorsStreamWriter(path, planned, metadata={"format": "pt"}) as writer:
    ...     for name in writer.order:
    ...         writer.write(name, mixed(name))  # written now; the caller may free it
    ```
    """

    def __init__(self, path: Path, planned: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        # Widest elements first: every tensor then starts at a multiple of its own element size.
        self.order = sorted(planned, key=lambda name: -planned[name].element_size())
        self.path, self.position = Path(path), 0
        self.expected = {name: (tuple(t.shape), t.dtype) for name, t in planned.items()}
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name in self.order:
            tensor = planned[name]
            size = tensor.numel() * tensor.element_size()
            header[name] = {
                "dtype": _CODES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._handle = open(self.path, "wb")  # noqa: SIM115 (open across write() calls; closed by close/__exit__)
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append `name`'s bytes; tensors must come in `order`, with the planned shape and dtype."""
        if self.position >= len(self.order) or self.order[self.position] != name:
            expected = self.order[self.position] if self.position < len(self.order) else "nothing more"
            raise ValueError(f"{self.path.name}: got tensor {name}, expected {expected}")
        if (tuple(tensor.shape), tensor.dtype) != self.expected[name]:
            raise ValueError(
                f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {self.expected[name]}"
            )
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(flat.numpy()))
        self.position += 1

    def close(self) -> None:
        self._handle.close()
        if self.position != len(self.order):
            raise ValueError(
                f"{self.path.name}: {len(self.order) - self.position} planned tensor(s) never written"
            )

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self._handle.close()  # the caller's error wins; the half-written file is the caller's to discard
