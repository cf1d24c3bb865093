"""Safetensors tensors read by byte range: from a local file (`os.pread`) or from a Hub file (HTTP Range requests).

Why not `safe_open`: it memory-maps each file, and every page a read touches stays mapped into this process until
the handle closes, so the process's resident memory grew with every byte read from every input (at 1 B parameters,
1.2-2.2x mergekit's peak RSS, all of it file-backed; issue 22). `pread` copies each tensor into fresh memory that
is freed with it; the page cache stays the kernel's. The same layout drives HTTP Range reads of Hub files, so
`--stream` reads a checkpoint tensor by tensor with no snapshot on disk.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length, a JSON header
with each tensor's dtype, shape and byte range (`data_offsets`, relative to the end of the header), then the bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .errors import CandidateFormatError, HubError

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
# A header larger than this is not a safetensors header (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


class ByteSource(Protocol):
    """Bytes of one file, read at any offset."""

    name: str
    size: int

    def read_into(self, offset: int, out: memoryview) -> None: ...


class LocalBytes:
    """A local file read with `os.pread`: no mapping, no shared file position (threads may read at once)."""

    def __init__(self, path: Path):
        self.name = str(path)
        self._fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        self.size = os.fstat(self._fd).st_size

    def read_into(self, offset: int, out: memoryview) -> None:
        done = 0
        while done < len(out):
            count = os.preadv(self._fd, [out[done:]], offset + done)
            if count == 0:
                raise CandidateFormatError(
                    f"{self.name} ends at byte {offset + done}, inside a tensor: the file is truncated. "
                    "Fetch it again."
                )
            done += count


class HubBytes:
    """A file of a Hub repo at a pinned commit, read with HTTP Range requests through `huggingface_hub`'s session.

    The first request fetches the file's first `PREFIX_BYTES` (the header, for any ordinary checkpoint) and its size
    (`Content-Range`). Each later read is one request, retried with backoff on dropped connections, timeouts and
    5xx answers (`http_backoff`); a read that still fails raises one `HubError`. `received` counts the bytes fetched.
    """

    PREFIX_BYTES = 1 << 16

    def __init__(self, repo_id: str, filename: str, revision: str):
        from huggingface_hub import hf_hub_url

        self.name = f"{repo_id}@{revision[:12]}/{filename}"
        self._url = hf_hub_url(repo_id, filename, revision=revision)
        self.received = 0
        self._prefix, self.size = self._get(0, self.PREFIX_BYTES - 1)

    def _get(self, first: int, last: int) -> tuple[bytes, int]:
        """Bytes `first..last` (inclusive; fewer at the end of the file) and the file's size."""
        import httpx2  # huggingface_hub's HTTP client
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

        try:
            response = http_backoff(
                "GET", self._url, headers={**build_hf_headers(), "Range": f"bytes={first}-{last}"}
            )
            hf_raise_for_status(response)
        except httpx2.TransportError as error:
            raise HubError(
                f"Reading bytes {first}-{last} of {self.name} failed after retries ({type(error).__name__}). "
                "Check your connection and run again; nothing was written."
            ) from error
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers.get("Content-Range", ""))
        if response.status_code != 206 or not match or int(match[1]) != first:
            raise HubError(
                f"{self.name}: the server did not answer the byte range {first}-{last} (HTTP "
                f"{response.status_code}); --stream needs Range requests. Drop --stream to download the files."
            )
        self.received += len(response.content)
        return response.content, int(match[3])

    def read_into(self, offset: int, out: memoryview) -> None:
        if offset + len(out) <= len(self._prefix):
            out[:] = self._prefix[offset : offset + len(out)]
            return
        content, _ = self._get(offset, offset + len(out) - 1)
        if len(content) != len(out):
            raise HubError(f"{self.name}: got {len(content)} bytes of {len(out)} at {offset}; run again.")
        out[:] = content


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes lie in its file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    stop: int

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize if self.shape else self.stop - self.start


def read_layout(source: ByteSource) -> tuple[dict[str, TensorSpan], dict[str, str]]:
    """Each tensor's span, and the file's `__metadata__`, from its header: two small reads.

    Raises:
        CandidateFormatError: not a safetensors file, a dtype hf-soup cannot read, or bytes missing (truncated).
    """
    invalid = f"{source.name} is not a valid safetensors file"
    if source.size < 8:
        raise CandidateFormatError(f"{invalid} (only {source.size} bytes); the download may be truncated: fetch it again.")
    length_bytes = bytearray(8)
    source.read_into(0, memoryview(length_bytes))
    (length,) = struct.unpack("<Q", length_bytes)
    if length > min(MAX_HEADER_BYTES, source.size - 8):
        raise CandidateFormatError(f"{invalid} (header of {length} bytes); the download may be truncated: fetch it again.")
    raw = bytearray(length)
    source.read_into(8, memoryview(raw))
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise CandidateFormatError(f"{invalid} (header is not JSON: {error}).") from error
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + length
    spans = {}
    for name, entry in header.items():
        try:
            stored, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as error:
            raise CandidateFormatError(f"{invalid} (bad entry for {name}).") from error
        if stored not in SAFETENSORS_DTYPES:
            raise CandidateFormatError(
                f"{source.name}: tensor {name} is stored as {stored}, which hf-soup cannot read; convert the model "
                "to float32, float16 or bfloat16 weights first."
            )
        dtype = SAFETENSORS_DTYPES[stored]
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise CandidateFormatError(f"{invalid} ({name}: {end - begin} bytes for shape {list(shape)} {stored}).")
        if data_start + end > source.size:
            raise CandidateFormatError(
                f"{source.name} is truncated ({source.size} bytes; {name} ends at {data_start + end}): fetch it again."
            )
        spans[name] = TensorSpan(dtype, shape, data_start + begin, data_start + end)
    return spans, metadata


def read_span(source: ByteSource, span: TensorSpan, first_row: int = 0, stop_row: int | None = None) -> torch.Tensor:
    """The tensor at `span` (rows `first_row:stop_row` along the first dimension), in fresh memory."""
    if stop_row is None:
        start, stop, shape = span.start, span.stop, span.shape
    else:
        rows = max(0, min(stop_row, span.shape[0]) - first_row)
        start = span.start + first_row * span.row_bytes
        stop, shape = start + rows * span.row_bytes, (rows, *span.shape[1:])
    buffer = torch.empty(stop - start, dtype=torch.uint8)
    if stop > start:
        source.read_into(start, memoryview(buffer.numpy()))
    return buffer.view(span.dtype).reshape(shape)
