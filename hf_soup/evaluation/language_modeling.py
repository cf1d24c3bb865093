"""Causal-LM evaluation (`--task causal-lm`): documents, the negative log-likelihood of each predicted token, and
what follows from it (mean token NLL, perplexity, the probability ensemble).

A document of T tokens predicts T − 1 of them. What a forward pass yields per document is the NLL of each
predicted token, zero past its end: a row of a `(documents, width)` array that plays the part the class logits
play for classification. From it:

- the selection loss is the **mean token NLL**, Σ NLL / Σ predicted tokens over the split (each token counts
  once, so long documents weigh more, as in the usual corpus perplexity); perplexity = exp(mean token NLL);
- a document's outcome (its summed NLL, >= 0) drives the exact early rejection: once the running sum exceeds
  the bar times the split's token count, no remaining document can bring the trial back;
- the ensemble of N models predicts each token with the mean of their probabilities, −log mean exp(−NLLᵢ), which
  needs only each model's NLL of the true token (the full distributions are never kept).

Documents longer than `--max-length` tokens are **truncated** (not packed), and the report says how many were.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..errors import DatasetError
from .splits import EncodedSplit
from .tasks import TaskSpec

# Logits of at most this many floats exist at once while scoring (a 49152-token vocabulary, 128-token documents:
# 10 documents per pass), whatever the evaluation batch size.
LOGIT_BUDGET = 1 << 26


def encode_document_split(
    name: str, data: Dataset, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> EncodedSplit:
    """Tokenise each document once, truncated to `max_length` tokens; `labels` holds each document's number of
    predicted tokens. Documents with fewer than two tokens predict nothing and are left out (counted as empty)."""
    if spec.text_column not in data.column_names:
        raise DatasetError(
            f"The {name} split has no column {spec.text_column!r}; its columns are {', '.join(data.column_names)}. "
            "Set --text-column."
        )
    if max_length < 2:
        raise DatasetError(f"--max-length must be at least 2 tokens for a causal LM, got {max_length}.")
    texts = [text if isinstance(text, str) else "" for text in data[spec.text_column]]
    # One token more than kept: a document that fills it was truncated.
    full = tokenizer(texts, truncation=True, max_length=max_length + 1)["input_ids"]
    features = [
        {"input_ids": ids[:max_length], "attention_mask": [1] * min(len(ids), max_length)}
        for ids in full
        if len(ids) >= 2
    ]
    empty = len(full) - len(features)
    if not features:
        raise DatasetError(f"The {name} split has no document of two or more tokens in {spec.text_column!r}.")
    truncated = sum(1 for ids in full if len(ids) > max_length)
    lengths = np.asarray([len(f["input_ids"]) for f in features])
    digest = hashlib.sha256(b"causal-lm")
    for feature in features:
        digest.update(np.asarray(feature["input_ids"], dtype=np.int64).tobytes() + b"|")
    return EncodedSplit(
        name,
        features,
        (lengths - 1).astype(np.int64),
        np.argsort(-lengths, kind="stable"),
        digest.hexdigest(),
        empty_inputs=empty,
        truncated=truncated,
    )


def pad_documents(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad a batch of documents. The padding id is never attended to nor predicted (causal attention, and
    masked targets), so tokenizers without a pad token need none."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.zeros(len(features), width, dtype=torch.long)
    attention_mask = torch.zeros(len(features), width, dtype=torch.long)
    for row, feature in enumerate(features):
        input_ids[row, : len(feature["input_ids"])] = torch.as_tensor(feature["input_ids"])
        attention_mask[row, : len(feature["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The NLL of each predicted token, `(batch, length − 1)` in float32, zero where the target is padding."""
    targets = input_ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return nll * attention_mask[:, 1:].to(nll.dtype)


class TokenLosses:
    """The forward pass of a causal-LM trial: each predicted token's NLL, padded to `width` columns.

    Documents go through the model in slices small enough that their logits hold at most `LOGIT_BUDGET` floats.
    """

    def __init__(self, width: int):
        self.width = width

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        vocabulary = model.get_output_embeddings().weight.shape[0]
        rows = max(1, LOGIT_BUDGET // (input_ids.shape[1] * vocabulary))
        out = torch.zeros(len(input_ids), self.width, dtype=torch.float32, device=input_ids.device)
        for start in range(0, len(input_ids), rows):
            ids, mask = input_ids[start : start + rows], attention_mask[start : start + rows]
            nll = token_nll(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
            out[start : start + rows, : nll.shape[1]] = nll
        return out


def outputs_width(split: EncodedSplit) -> int:
    """Columns of a split's per-token NLL array: its longest document's predicted tokens."""
    return int(split.labels.max()) if len(split) else 0


def mean_token_nll(token_losses: np.ndarray, tokens: np.ndarray) -> float:
    """Σ NLL / Σ predicted tokens, summed in float64 (as the early-rejection bound sums)."""
    return float(np.sum(token_losses, dtype=np.float64) / max(1, int(np.sum(tokens))))


def document_metrics(token_losses: np.ndarray, tokens: np.ndarray) -> tuple[dict[str, float], float]:
    """`({"perplexity", "nll"}, loss)` of a split's per-token NLL; the loss is the mean token NLL."""
    loss = mean_token_nll(token_losses, tokens)
    return {"perplexity": float(np.exp(loss)), "nll": loss}, loss


def ensemble_token_nll(members: list[np.ndarray]) -> np.ndarray:
    """The probability ensemble's per-token NLL: −log of the mean of the members' probabilities of each true
    token (padding stays zero: every member has NLL 0 there)."""
    stacked = torch.from_numpy(np.stack(members).astype(np.float64))
    mean_log_probability = torch.logsumexp(-stacked, dim=0) - np.log(len(members))
    return (-mean_log_probability).clamp_min(0).numpy().astype(np.float32)


def language_modeling_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean token NLL of a batch, differentiable (the learned soup's training loss)."""
    nll = token_nll(logits, batch["input_ids"], batch["attention_mask"])
    return nll.sum() / batch["attention_mask"][:, 1:].sum().clamp_min(1)
