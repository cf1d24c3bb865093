"""Plan the soup's vocabulary: row maps for candidates whose embedding rows or tokenizer differ from the base's
(the alignment itself is `checkpoints/vocab.py`), and a warning when candidates mix dtypes."""

from __future__ import annotations

from pathlib import Path

from ..checkpoints.sources import TensorReader
from ..checkpoints.vocab import (
    TokenizerCheck,
    VocabAlignment,
    VocabMode,
    align_vocabularies,
    tokenizer_vocabulary,
    vocabulary_tensors,
)
from ..errors import IncompatibleCandidatesError
from .report import CompatibilityReport


def plan_vocabulary(
    report: CompatibilityReport, base_source, readers, tokenizers: TokenizerCheck, mode: VocabMode
) -> VocabAlignment | None:
    """Row maps for candidates whose vocabulary rows or tokenizer differ from the base's (`vocab.py`); `None`,
    without loading any tokenizer, when every candidate has the base's rows and tokenizer files."""
    reference = report.accepted[0]
    tensors = [
        n for n in vocabulary_tensors(readers[reference.id], reference.config) if n in report.base_names
    ]
    if not tensors:
        return None
    base_rows = base_source.shape(report.base_names[tensors[0]])[0]
    rows = {c.id: readers[c.id].shape(tensors[0])[0] for c in report.accepted}
    own = {c.id: Path(c.local_dir) for c in report.accepted if not tokenizers.same_files(Path(c.local_dir))}
    if all(count == base_rows for count in rows.values()) and not own:
        return None
    if not tokenizers.files:
        raise IncompatibleCandidatesError(
            f"The candidates' embeddings have {sorted(set(rows.values()))} rows and the base's {base_rows}, and the "
            "base has no tokenizer files to align them by token: save the base's tokenizer next to it."
        )
    candidates = {}
    for candidate in report.accepted:
        found = tokenizer_vocabulary(own[candidate.id]) if candidate.id in own else None
        candidates[candidate.id] = (rows[candidate.id], *(found or (None, {})))
    alignment = align_vocabularies(
        report.base.id, base_rows, tokenizers.vocabulary(), candidates, tensors, mode
    )
    for cid, tokens in (alignment.dropped if alignment else {}).items():
        report.warnings.append(
            f"{cid} has {len(tokens)} token(s) the base lacks ({', '.join(map(repr, tokens[:5]))}"
            f"{', ...' if len(tokens) > 5 else ''}): their embedding rows are dropped; --vocab union keeps them"
        )
    return alignment


def dtype_warnings(readers: dict[str, TensorReader]) -> list[str]:
    dtypes = {str(reader.dtype(n)) for reader in readers.values() for n in list(reader.keys())[:1]}
    if len(dtypes) > 1:
        return [f"candidates mix dtypes ({', '.join(sorted(dtypes))}); they are averaged in float32"]
    return []
