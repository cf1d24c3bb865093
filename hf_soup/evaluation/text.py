"""Text encoding: tokenise a split once, sorted by length for tight batches, with labels as model label ids."""

from __future__ import annotations

import hashlib

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .data import check_columns
from .splits import EncodedSplit, label_ids
from .tasks import TaskSpec


def encode_text_split(
    name: str,
    data: Dataset,
    spec: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_labels: list[str] | None,
    num_labels: int,
    max_length: int = 128,
) -> EncodedSplit:
    """Tokenise `data` once and map its labels to model label ids."""
    check_columns(spec, data, name)
    labels, positive = label_ids(spec, data, model_labels, num_labels, name)
    columns = [data[spec.text_column], *([data[spec.text_pair_column]] if spec.text_pair_column else [])]
    # Missing or blank texts are scored as empty strings, and counted so that the report can say so.
    empty = sum(1 for row in zip(*columns) if any(t is None or not str(t).strip() for t in row))
    texts = [text or "" for text in columns[0]]
    pairs = [text or "" for text in columns[1]] if spec.text_pair_column else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    features = [{k: encoded[k][i] for k in keys} for i in range(len(texts))]
    lengths = np.asarray([len(f["input_ids"]) for f in features])
    digest = hashlib.sha256()
    for feature in features:
        digest.update(np.asarray(feature["input_ids"], dtype=np.int64).tobytes())
    digest.update(labels.tobytes())
    order = np.argsort(-lengths, kind="stable")
    return EncodedSplit(
        name, features, labels, order, digest.hexdigest(), pos_label=positive, empty_inputs=empty
    )
