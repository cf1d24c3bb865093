"""Hub checkpoints read by byte range: safetensors tensors fetched with HTTP Range requests, one at a time.

Without a snapshot on disk, a soup of 8 x 7 B bf16 checkpoints does not first need 112 GB of downloads and of
disk: `--stream` reads each tensor when the soup needs it (`HubTensorSource`), and `hf-soup check` reads only the
headers. The reads go through `huggingface_hub`'s own HTTP session, headers and retry policy (`http_backoff`).

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length, a JSON header
with each tensor's dtype, shape and byte range (`data_offsets`, relative to the end of the header), then the bytes.
`safe_open` needs a local file, so the header is parsed here; local files are still read with `safe_open`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import CandidateFormatError, HubError, NonFiniteWeightsError
from .weights import SAFETENSORS_DTYPES, non_finite

# A header larger than this is not a safetensors header (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000


class ByteSource(Protocol):
    """Bytes of one file, read at any offset."""

    name: str
    size: int

    def read_into(self, offset: int, out: memoryview) -> None: ...


class HubBytes:
    """A file of a Hub repo at a pinned commit, read with HTTP Range requests through `huggingface_hub`'s session.

    The first request fetches the file's first `PREFIX_BYTES` (the header, for any ordinary checkpoint) and its size
    (`Content-Range`). Each later read is one request, retried with backoff on dropped connections, timeouts and
    5xx answers (`http_backoff`); a read that still fails, or an HTTP error, raises one `HubError`.
    """

    PREFIX_BYTES = 1 << 16

    def __init__(self, repo_id: str, filename: str, revision: str):
        from huggingface_hub import hf_hub_url

        self.name = f"{repo_id}@{revision[:12]}/{filename}"
        self._url = hf_hub_url(repo_id, filename, revision=revision)
        self._prefix, self.size = self._get(0, self.PREFIX_BYTES - 1)

    def _get(self, first: int, last: int) -> tuple[bytes, int]:
        """Bytes `first..last` (inclusive; fewer at the end of the file) and the file's size."""
        import httpx2  # huggingface_hub's HTTP client
        from huggingface_hub.errors import HfHubHTTPError
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
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else "?"
            raise HubError(
                f"Reading bytes {first}-{last} of {self.name}: the Hub answered HTTP {status}. Check HF_TOKEN and "
                "run again; nothing was written."
            ) from error
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers.get("Content-Range", ""))
        if response.status_code != 206 or not match or int(match[1]) != first:
            raise HubError(
                f"{self.name}: the server did not answer the byte range {first}-{last} (HTTP "
                f"{response.status_code}); --stream needs Range requests. Drop --stream to download the files."
            )
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


def read_layout(source: ByteSource) -> dict[str, TensorSpan]:
    """Each tensor's span, from the file's header: two small reads.

    Raises:
        CandidateFormatError: not a safetensors file, a dtype hf-soup cannot read, or bytes missing (truncated).
    """
    invalid = f"{source.name} is not a valid safetensors file"
    if source.size < 8:
        raise CandidateFormatError(
            f"{invalid} (only {source.size} bytes); the download may be truncated: fetch it again."
        )
    length_bytes = bytearray(8)
    source.read_into(0, memoryview(length_bytes))
    (length,) = struct.unpack("<Q", length_bytes)
    if length > min(MAX_HEADER_BYTES, source.size - 8):
        raise CandidateFormatError(
            f"{invalid} (header of {length} bytes); the download may be truncated: fetch it again."
        )
    raw = bytearray(length)
    source.read_into(8, memoryview(raw))
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise CandidateFormatError(f"{invalid} (header is not JSON: {error}).") from error
    header.pop("__metadata__", None)
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
            raise CandidateFormatError(
                f"{invalid} ({name}: {end - begin} bytes for shape {list(shape)} {stored})."
            )
        if data_start + end > source.size:
            raise CandidateFormatError(
                f"{source.name} is truncated ({source.size} bytes; {name} ends at {data_start + end}): fetch it again."
            )
        spans[name] = TensorSpan(dtype, shape, data_start + begin, data_start + end)
    return spans


def read_span(
    source: ByteSource, span: TensorSpan, first_row: int = 0, stop_row: int | None = None
) -> torch.Tensor:
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


class HubTensorSource:
    """The tensors of a Hub checkpoint at a pinned commit, read by range: a `sources.TensorReader`.

    Opening it reads each shard's header (one small request per shard); tensors are fetched only when asked for.
    `fingerprint` is made from the Hub's sha256 of each weight file (LFS metadata), so nothing is hashed here, and
    float tensors are checked for NaN/Inf as they are read, since a streamed checkpoint is never read whole first.

    Raises:
        CandidateFormatError: the repo has no safetensors weights, or a shard is missing or malformed.
    """

    def __init__(self, repo_id: str, revision: str, api):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.constants import SAFETENSORS_INDEX_FILE, SAFETENSORS_SINGLE_FILE

        self.repo_id = repo_id
        found = {
            e.path: e
            for e in api.get_paths_info(
                repo_id, [SAFETENSORS_SINGLE_FILE, SAFETENSORS_INDEX_FILE], revision=revision
            )
        }
        if SAFETENSORS_INDEX_FILE in found:
            index = json.loads(
                Path(hf_hub_download(repo_id, SAFETENSORS_INDEX_FILE, revision=revision)).read_text()
            )
            names = sorted(set(index["weight_map"].values()))
            found = {e.path: e for e in api.get_paths_info(repo_id, names, revision=revision)}
            missing = [n for n in names if n not in found]
            if missing:
                raise CandidateFormatError(
                    f"its {SAFETENSORS_INDEX_FILE} lists shards that are missing ({', '.join(missing)})"
                )
        elif SAFETENSORS_SINGLE_FILE in found:
            names = [SAFETENSORS_SINGLE_FILE]
        else:
            raise CandidateFormatError(
                "has no safetensors weights; hf-soup does not download pickle weights from the Hub"
            )
        digest = hashlib.sha256()
        for name in names:
            entry = found[name]
            digest.update(f"{name}:{entry.lfs.sha256 if entry.lfs else entry.blob_id}\n".encode())
        self.fingerprint = "hub-files:" + digest.hexdigest()
        self.files: list[HubBytes] = []
        self.bytes_read = 0  # tensor bytes fetched by `get` and `rows` (`--profile` reports them)
        self._spans: dict[str, tuple[HubBytes, TensorSpan]] = {}
        for name in names:
            source = HubBytes(repo_id, name, revision)
            self.files.append(source)
            spans = read_layout(source)
            self._spans.update({tensor: (source, span) for tensor, span in spans.items()})

    @property
    def stored(self) -> HubTensorSource:
        """The tensors held in `files`: this checkpoint's own (as `weights.TensorSource.stored`)."""
        return self

    def keys(self) -> list[str]:
        return list(self._spans)

    def __contains__(self, name: str) -> bool:
        return name in self._spans

    def shape(self, name: str) -> tuple[int, ...]:
        return self._spans[name][1].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._spans[name][1].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._checked(name, read_span(*self._spans[name]))

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._checked(name, read_span(*self._spans[name], start, stop))

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        if non_finite(tensor):
            raise NonFiniteWeightsError(
                f"{self.repo_id} has NaN or Inf values in {name}: the fine-tune diverged. Remove it from --candidates."
            )
        return tensor
