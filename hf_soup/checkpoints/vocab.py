"""Candidates whose embedding rows differ from the base's, aligned by token string.

Fine-tunes of one base often change its vocabulary: `tokenizer.add_tokens(...)` plus `resize_token_embeddings` adds
rows (chat or tool tokens), and resizing to a multiple of 64 pads them. Row k then does not mean the same token in
every model, or does not exist in some. Each candidate's rows are matched by token string against the base's
tokenizer:
- `--vocab base` (the default): the soup keeps the base's vocabulary and tokenizer; rows of tokens the base lacks
  are dropped, with a warning that names them;
- `--vocab union`: tokens the base lacks are kept, after the base's, in the order the candidates list them; each
  such row is averaged over the ingredients that have it, and the soup's tokenizer gets those tokens.
A row no ingredient has (one of the base's padding rows, say) keeps the base's value.

The vocabulary tensors of a checkpoint are its 2-D float tensors with `config.vocab_size` rows (the input
embeddings, and an untied output layer); tied models store only the embeddings, and stay tied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..errors import IncompatibleCandidatesError

VocabMode = Literal["base", "union"]
# A candidate that lacks more of the base's tokens than this does not use the base's tokenizer at all.
MAX_MISSING_BASE_TOKENS = 0.01


@dataclass
class NewToken:
    """A token the base lacks, kept by `--vocab union`."""

    content: str
    special: bool


@dataclass
class VocabAlignment:
    """Which output row comes from which row of each ingredient (the base under its id); -1: it has none.

    Args:
        tensors (`list[str]`): the vocabulary tensors (candidate names).
        rows (`int`): the soup's vocabulary rows.
        row_maps (`dict[str, torch.Tensor]`): per ingredient id, a `rows`-long int64 index into its own rows.
        added (`list[NewToken]`): with `--vocab union`, the tokens appended after the base's.
        dropped (`dict[str, list[str]]`): with `--vocab base`, each candidate's tokens the base lacks.
    """

    tensors: list[str]
    rows: int
    row_maps: dict[str, torch.Tensor]
    added: list[NewToken] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)

    def gather(self, cid: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`'s rows in the soup's order; rows `cid` lacks are zero (see `present`)."""
        index = self.row_maps[cid]
        present = index >= 0
        out = tensor.new_zeros((self.rows, *tensor.shape[1:]))
        out[present] = tensor[index[present]]
        return out

    def present(self, cid: str) -> torch.Tensor:
        return self.row_maps[cid] >= 0

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "tensors": self.tensors,
            "added": [token.content for token in self.added],
            "dropped": self.dropped,
        }


def vocabulary_tensors(reader, config: dict) -> list[str]:
    """The 2-D float tensors with `config.vocab_size` rows: the embeddings, and an untied output layer."""
    rows = config.get("vocab_size")
    return [
        name
        for name in reader.keys()
        if rows
        and len(reader.shape(name)) == 2
        and reader.shape(name)[0] == rows
        and reader.dtype(name) in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    ]


def tokenizer_vocabulary(folder: Path) -> tuple[dict[str, int], dict[str, bool]] | None:
    """Token → id, and which tokens are special added tokens, of the tokenizer saved in `folder` (None if none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        return None
    special = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
    return tokenizer.get_vocab(), special


def missing_share(base_vocab: dict[str, int], theirs: dict[str, int]) -> float:
    return sum(token not in theirs for token in base_vocab) / max(1, len(base_vocab))


def align_vocabularies(
    base_id: str,
    base_rows: int,
    base_vocab: dict[str, int],
    candidates: dict[str, tuple[int, dict[str, int] | None, dict[str, bool]]],
    tensors: list[str],
    mode: VocabMode,
) -> VocabAlignment | None:
    """Row maps for every ingredient, or `None` when every candidate already has the base's rows and tokens.

    Args:
        candidates: per candidate id, `(its vocabulary rows, its tokenizer's token → id or None, special flags)`;
            a candidate without a tokenizer is taken to use the base's ids.
    """
    same = all(rows == base_rows and vocab in (None, base_vocab) for rows, vocab, _ in candidates.values())
    if same:
        return None
    base_tokens = {i: token for token, i in base_vocab.items()}
    added: dict[str, bool] = {}
    dropped: dict[str, list[str]] = {}
    for cid, (_, vocab, special) in candidates.items():
        extra = [t for t, _ in sorted((vocab or {}).items(), key=lambda item: item[1]) if t not in base_vocab]
        if mode == "union":
            added.update({t: special.get(t, False) for t in extra if t not in added})
        elif extra:
            dropped[cid] = extra
    # Base tokens keep their ids; added tokens take the ids the soup's tokenizer gives them (after the base's
    # tokens, over any padding rows); padding rows stay where they were. `None` marks a padding row.
    tokens = max(base_vocab.values(), default=-1) + 1
    extra = list(added)
    order = [
        base_tokens.get(row) if row < tokens else (extra[row - tokens] if row < tokens + len(extra) else None)
        for row in range(max(base_rows, tokens + len(extra)))
    ]
    base_index = [base_vocab.get(t, r if t is None and r < base_rows else -1) for r, t in enumerate(order)]
    row_maps = {base_id: torch.tensor(base_index, dtype=torch.int64)}
    for cid, (rows, vocab, _) in candidates.items():
        ids = vocab if vocab is not None else base_vocab
        used = set(ids.values())
        index = []
        for row, token in enumerate(order):
            if token is not None:
                index.append(ids.get(token, -1))
            else:  # a padding row of the base's: the same row of the candidate's padding, if it has one
                index.append(row if row < rows and row not in used else -1)
        row_maps[cid] = torch.tensor(index, dtype=torch.int64)
    for cid, index in row_maps.items():
        if cid != base_id and int(index.max()) >= candidates[cid][0]:
            raise IncompatibleCandidatesError(
                f"{cid}'s tokenizer has ids beyond its {candidates[cid][0]} embedding rows; save the tokenizer "
                "that matches its weights."
            )
    return VocabAlignment(tensors, len(order), row_maps, [NewToken(t, s) for t, s in added.items()], dropped)


_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def tokenizer_files(folder: Path) -> list[Path]:
    return [folder / name for name in _TOKENIZER_FILES if (folder / name).is_file()]


class TokenizerCheck:
    """Refuses a candidate whose own tokenizer is not the base's at all (it lacks more than 1% of the base's
    tokens). Other differences (added tokens, tokens at other ids) are aligned by token string (`vocab.py`).
    Identical files are accepted without loading anything.
    """

    def __init__(self, reference: Path):
        self.reference = reference
        self.files = {p.name: p.read_bytes() for p in tokenizer_files(reference)}
        self._vocabulary: dict[str, int] | None = None

    def same_files(self, folder: Path) -> bool:
        files = tokenizer_files(folder)
        return not files or all(self.files.get(p.name) == p.read_bytes() for p in files)

    def vocabulary(self) -> dict[str, int]:
        if self._vocabulary is None:
            found = tokenizer_vocabulary(self.reference) if self.files else None
            self._vocabulary = found[0] if found else {}
        return self._vocabulary

    def problem(self, folder: Path) -> str | None:
        if not self.files or self.same_files(folder):
            return None
        theirs = tokenizer_vocabulary(folder)
        if theirs is None or missing_share(self.vocabulary(), theirs[0]) <= MAX_MISSING_BASE_TOKENS:
            return None
        lacking = sorted(t for t in self.vocabulary() if t not in theirs[0])
        return (
            f"its tokenizer is not {self.reference.name}'s: it lacks {len(lacking)} of its {len(self.vocabulary())} "
            f"tokens (e.g. {lacking[0]!r}); soup models that share the base's tokenizer"
        )
