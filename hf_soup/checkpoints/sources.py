"""The sources layer: the open weights of a soup's base and its accepted candidates, read aligned.

Everything that turns a mixture into tensors (the writer, the live model of the scorer, the diagnostics, the
learned soup's gradients) reads through one `SoupSources`. It knows the base as the base (there is no magic key
for it), which candidate is the reference, how each head's rows are permuted to one label order, and which
candidate tensor is which base tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import ConfigError
from .vocab import VocabAlignment

# Module names under which classification heads live in transformers models (BERT/ViT `classifier`,
# RoBERTa `classifier.out_proj`, decoder models `score`, ConvNeXt-style `head`).
HEAD_PARTS = {"classifier", "score", "head", "out_proj"}


class TensorReader(Protocol):
    """Named tensors, read one at a time: a checkpoint folder (`weights.TensorSource`), a LoRA adapter seen as
    its merged model (`lora.LoraSource`), or a Hub checkpoint read by range (`ranged.HubTensorSource`)."""

    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...
    def rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...


class BodyView:
    """A candidate's shared body: its tensors that the base has too (`--soup backbone`), as a `TensorReader`.

    Everything else the reader offers (its files, for fingerprints) is the whole candidate's.
    """

    def __init__(self, reader: TensorReader, names: list[str]):
        self.reader, self.names = reader, names

    def keys(self) -> list[str]:
        return self.names

    def left_out(self) -> list[str]:
        """The candidate's tensors outside the body: its task head."""
        body = set(self.names)
        return [name for name in self.reader.keys() if name not in body]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.reader.rows(name, start, stop)

    def __getattr__(self, name: str):
        return getattr(self.reader, name)


class HeldReader:
    """A reader whose tensors are read once and then served from memory to every caller: the single pass
    (`pipeline/single_pass.py`) verifies and merges one tensor name from the same read. Everything else (files,
    fingerprint, the stored adapter) is the wrapped reader's."""

    def __init__(self, reader: TensorReader):
        self.reader = reader
        self._held: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._held:
            self._held[name] = self.reader.get(name)
        return self._held[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[start:stop]

    def __getattr__(self, name: str):
        return getattr(self.reader, name)


@dataclass
class Alignment:
    """How candidates' tensors line up: head rows in one label order, and candidate names → base names."""

    # Row order to apply to each head tensor so every candidate's labels follow the reference label order.
    permutations: dict[str, list[int]] = field(default_factory=dict)
    base_permutation: list[int] | None = None  # the same, for a base that ships a head with these labels
    head_tensors: list[str] = field(default_factory=list)
    # Candidate tensor name -> base tensor name, for the tensors the base also has.
    base_names: dict[str, str] = field(default_factory=dict)
    vocab: VocabAlignment | None = None  # embedding rows matched by token string, when vocabularies differ


@dataclass
class SoupSources:
    """The base and the accepted candidates (the reference first), readable tensor by tensor, aligned.

    Args:
        base_id (`str`): the base's id, as mixtures name it.
        base (`TensorReader`): the base's weights.
        candidates (`dict[str, TensorReader]`): each accepted candidate's weights; the first is the reference,
            whose tensor names, non-float buffers and config define the soup.
        alignment (`Alignment`): head permutations and the base-name map.
    """

    base_id: str
    base: TensorReader
    candidates: dict[str, TensorReader]
    alignment: Alignment = field(default_factory=Alignment)

    @property
    def reference_id(self) -> str:
        return next(iter(self.candidates))

    @property
    def reference(self) -> TensorReader:
        return self.candidates[self.reference_id]

    def restricted(self, ids: list[str]) -> SoupSources:
        """The same sources with only the candidates `ids` (duplicates dropped after fingerprinting)."""
        return SoupSources(self.base_id, self.base, {c: self.candidates[c] for c in ids}, self.alignment)

    def held(self) -> SoupSources:
        """The same sources reading each tensor once (`HeldReader`): drop the result to free what it read."""
        candidates = {cid: HeldReader(reader) for cid, reader in self.candidates.items()}
        return SoupSources(self.base_id, HeldReader(self.base), candidates, self.alignment)

    def bytes_read(self) -> int:
        """Tensor bytes read so far from the base's and the candidates' files (each file's reader counted once)."""
        readers = {
            id(r): r for reader in (self.base, *self.candidates.values()) for r in _file_readers(reader)
        }
        return sum(r.bytes_read for r in readers.values())

    def reader(self, cid: str) -> TensorReader:
        """The reader of candidate `cid`, or of the base when `cid` is the base's id."""
        return self.base if cid == self.base_id else self.candidates[cid]

    def read(self, cid: str, name: str) -> torch.Tensor:
        """Tensor `name` (a candidate tensor name) of candidate `cid` or of the base, head rows aligned."""
        if cid == self.base_id:
            return self.read_base(name)
        tensor = self.candidates[cid].get(name)
        permutation = self.alignment.permutations.get(cid)
        if permutation is not None and name in self.alignment.head_tensors:
            tensor = tensor[permutation]
        return self._vocabulary_rows(cid, name, tensor)

    def _vocabulary_rows(self, cid: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
        vocab = self.alignment.vocab
        return vocab.gather(cid, tensor) if vocab is not None and name in vocab.tensors else tensor

    def missing_rows(self, cid: str, name: str) -> torch.Tensor | None:
        """Which rows of tensor `name` ingredient `cid` lacks (vocabulary rows of tokens it does not have)."""
        vocab = self.alignment.vocab
        if vocab is None or name not in vocab.tensors:
            return None
        missing = ~vocab.present(cid)
        return missing if bool(missing.any()) else None

    def output_shape(self, name: str) -> tuple[int, ...]:
        """The soup's shape of tensor `name`: the reference's, with the soup's vocabulary rows."""
        shape = self.reference.shape(name)
        vocab = self.alignment.vocab
        return (vocab.rows, *shape[1:]) if vocab is not None and name in vocab.tensors else shape

    def read_base(self, name: str) -> torch.Tensor:
        """The base's tensor for candidate tensor `name`.

        Raises:
            ConfigError: the base has no such tensor (usually the task head), so it cannot be given a weight there.
        """
        stored = self.alignment.base_names.get(name)
        if stored is None:
            raise ConfigError(
                f"The base has no tensor for {name} (usually the task head), so it cannot be given a weight there."
            )
        tensor = self.base.get(stored)
        permutation = self.alignment.base_permutation
        if permutation is not None and name in self.alignment.head_tensors:
            tensor = tensor[permutation]
        return self._vocabulary_rows(self.base_id, name, tensor)


def _file_readers(reader) -> list:
    """The readers of files behind `reader`: itself, or what a view (`BodyView`, `HeldReader`) or a LoRA adapter
    (its adapter and its base) reads from."""
    while isinstance(reader, (BodyView, HeldReader)):
        reader = reader.reader
    if hasattr(reader, "bytes_read"):
        return [reader]
    return [
        r
        for part in ("adapter", "base")
        if (child := getattr(reader, part, None))
        for r in _file_readers(child)
    ]
