"""Stage 2: decide which candidates can be souped together, from configs and safetensors headers only.

No tensor data is read here. A candidate is rejected, with its reason, when its architecture, tensor names,
shapes or label set differ from the reference (the first readable candidate). Heads whose labels are the same
names in another order are accepted and permuted to the reference order when read.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .candidates import Candidate, gather_candidates, resolve_base
from .errors import IncompatibleCandidatesError, NoCandidatesError
from .weights import TensorSource, averaged

logger = logging.getLogger(__name__)

# Module names under which classification heads live in transformers models (BERT/ViT `classifier`,
# RoBERTa `classifier.out_proj`, decoder models `score`, ConvNeXt-style `head`).
HEAD_PARTS = {"classifier", "score", "head", "out_proj"}
BASE = "__base__"  # the base's key among the tensor sources


@dataclass
class Rejection:
    candidate_id: str
    reason: str


@dataclass
class CompatibilityReport:
    """Which candidates passed the check, which did not and why, and how to align their heads."""

    accepted: list[Candidate]
    rejected: list[Rejection]
    base: Candidate
    label_names: list[str] | None
    # Row order to apply to each head tensor so every candidate's labels follow `label_names`.
    permutations: dict[str, list[int]] = field(default_factory=dict)
    head_tensors: list[str] = field(default_factory=list)
    # Candidate tensor name -> base tensor name, for the tensors the base also has.
    base_names: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def raise_if_unusable(self, strict: bool = False, minimum: int = 2) -> None:
        """Fail when `strict` and anything was rejected, or when fewer than `minimum` candidates remain."""
        reasons = "; ".join(f"{r.candidate_id}: {r.reason}" for r in self.rejected)
        if strict and self.rejected:
            raise IncompatibleCandidatesError(
                f"--strict: {len(self.rejected)} candidate(s) rejected ({reasons}). "
                "Remove them from --candidates or drop --strict."
            )
        if len(self.accepted) < minimum:
            detail = f" Rejected: {reasons}." if reasons else ""
            raise NoCandidatesError(
                f"Only {len(self.accepted)} compatible candidate(s); a soup needs at least {minimum}.{detail} "
                "Add more fine-tunes of the same base to --candidates."
            )

    def reject_duplicates(self, fingerprints: dict[str, str]) -> list[str]:
        """Reject every candidate whose content fingerprint equals an earlier one's, so it counts once.

        A copied folder, or a Trainer's last checkpoint next to its final save, would otherwise weigh twice in every
        recipe and in the ensemble. Returns the ids rejected.
        """
        first: dict[str, str] = {}
        duplicates = []
        for candidate in self.accepted:
            original = first.setdefault(fingerprints[candidate.id], candidate.id)
            if original != candidate.id:
                duplicates.append(candidate.id)
                self.rejected.append(
                    Rejection(candidate.id, f"identical to {original} (same content): it counts once")
                )
        self.accepted = [c for c in self.accepted if c.id not in duplicates]
        return duplicates

    def rows(self) -> list[tuple[str, str, str]]:
        """`(candidate, status, detail)` rows for the printed table."""
        rows = []
        for candidate in self.accepted:
            details = ["LoRA adapter, used as its merged model"] if candidate.kind == "lora" else []
            if candidate.id in self.permutations:
                details.append("labels permuted to reference order")
            rows.append((candidate.id, "accepted", "; ".join(details)))
        rows.extend((r.candidate_id, "rejected", r.reason) for r in self.rejected)
        return rows

    def to_dict(self) -> dict:
        return {
            "accepted": [c.id for c in self.accepted],
            # Non-float tensors come from the reference candidate; `reproduce` puts it first again.
            "reference": {"id": self.accepted[0].id, "revision": self.accepted[0].revision}
            if self.accepted
            else None,
            "rejected": [{"id": r.candidate_id, "reason": r.reason} for r in self.rejected],
            "label_names": self.label_names,
            "permuted": sorted(self.permutations),
            "lora": [c.id for c in self.accepted if c.kind == "lora"],
            "hub": [
                c.id for c in self.accepted if c.source == "hub"
            ],  # the card's `base_model` lists only these
            "base_on_hub": self.base.source == "hub",
            "warnings": self.warnings,
        }


def _architecture(candidate: Candidate) -> tuple:
    return (candidate.model_type, candidate.architectures)


def _describe_names(missing: set[str], extra: set[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s), e.g. {sorted(missing)[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected tensor(s), e.g. {sorted(extra)[0]}")
    return "; ".join(parts)


def _compare_tensors(reference: TensorSource, other: TensorSource) -> str | None:
    ref_names, other_names = set(reference.keys()), set(other.keys())
    if ref_names != other_names:
        return f"tensor names differ: {_describe_names(ref_names - other_names, other_names - ref_names)}"
    for name in reference.keys():
        if reference.shape(name) != other.shape(name):
            return (
                f"tensor {name} has shape {list(other.shape(name))}, expected {list(reference.shape(name))} "
                "(a resized vocabulary or a different model size)"
            )
        if averaged(reference.dtype(name)) != averaged(other.dtype(name)):
            return f"tensor {name} has dtype {other.dtype(name)}, expected {reference.dtype(name)}"
    return None


def _ties_embeddings(candidate: Candidate) -> bool:
    return bool(candidate.config.get("tie_word_embeddings", True))


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


def _vocabulary(folder: Path) -> dict[str, int] | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder).get_vocab()
    except (OSError, ValueError, TypeError):
        return None


class TokenizerCheck:
    """Compares each candidate's own tokenizer, when it saved one, with the base's (same tokens, same ids).

    Same-sized vocabularies with other tokens pass every shape check, yet embedding row k means a different
    token in each model. Identical files are accepted without loading anything.
    """

    def __init__(self, reference: Path):
        self.reference = reference
        self.files = {p.name: p.read_bytes() for p in tokenizer_files(reference)}
        self._vocabulary: dict[str, int] | None = None

    def problem(self, folder: Path) -> str | None:
        files = tokenizer_files(folder)
        if not files or not self.files:
            return None
        if all(self.files.get(p.name) == p.read_bytes() for p in files):
            return None
        if self._vocabulary is None:
            self._vocabulary = _vocabulary(self.reference) or {}
        theirs = _vocabulary(folder)
        if theirs is None or theirs == self._vocabulary:
            return None
        moved = sorted(t for t, i in theirs.items() if self._vocabulary.get(t) != i)
        return (
            f"its tokenizer differs from {self.reference.name}'s: {len(moved)} of {len(theirs)} tokens are new or "
            f"have other ids (e.g. {moved[0]!r}), so embedding rows mean different tokens; soup models that share "
            "the base's tokenizer"
        )


def _signature(candidate: Candidate, source: TensorSource) -> tuple:
    tensors = tuple(sorted((n, source.shape(n), averaged(source.dtype(n))) for n in source.keys()))
    labels = tuple(sorted(candidate.label_names)) if candidate.label_names else None
    return (_architecture(candidate), candidate.num_labels, tensors, labels)


def _align_labels(reference: list[str] | None, candidate: Candidate) -> tuple[list[int] | None, str | None]:
    """The row permutation that maps `candidate`'s head onto `reference`'s label order, or a rejection."""
    names = candidate.label_names
    if reference is None or names is None:
        return None, None
    if sorted(names) != sorted(reference):
        return None, f"label set {names} differs from the reference {reference}"
    if names == reference:
        return None, None
    return [names.index(label) for label in reference], None


def _base_name_map(base: TensorSource, candidate: TensorSource) -> dict[str, str]:
    """Match base tensor names to candidate names, allowing for the task model's prefix (`bert.` etc.)."""
    candidate_names = set(candidate.keys())
    prefixes = Counter(name.split(".", 1)[0] for name in candidate_names if "." in name)
    best_prefix = ""
    best_hits = sum(name in candidate_names for name in base.keys())
    for prefix in prefixes:
        hits = sum(f"{prefix}.{name}" in candidate_names for name in base.keys())
        if hits > best_hits:
            best_prefix, best_hits = prefix, hits
    mapping = {}
    for name in base.keys():
        full = f"{best_prefix}.{name}" if best_prefix else name
        if full in candidate_names:
            mapping[full] = name
    return mapping


def _head_tensors(source: TensorSource, num_labels: int, base_names: dict[str, str]) -> list[str]:
    heads = []
    for name in source.keys():
        shape = source.shape(name)
        if not shape or shape[0] != num_labels or not averaged(source.dtype(name)):
            continue
        if name not in base_names or HEAD_PARTS & set(name.split(".")[:-1]):
            heads.append(name)
    return heads


@dataclass
class _BaseHead:
    names: list[str]  # candidate names of the head tensors the base has too
    dropped: str | None = None  # why the base's own head is not the candidates' head
    permutation: list[int] | None = None


def _base_head(
    base: Candidate,
    base_source: TensorSource,
    reference_source: TensorSource,
    base_names: dict[str, str],
    labels: list[str] | None,
) -> _BaseHead:
    """A base that ships a head of its own (an ImageNet classifier, or a classifier of another label set) is
    treated as a base with no head; one with the candidates' labels in another order is permuted like them."""
    names = [c for c in base_names if HEAD_PARTS & set(c.split(".")[:-1])]
    if not names:
        return _BaseHead(names)
    shapes = {c: (list(base_source.shape(base_names[c])), list(reference_source.shape(c))) for c in names}
    mismatched = [c for c, (ours, theirs) in shapes.items() if ours != theirs]
    if mismatched:
        ours, theirs = shapes[mismatched[0]]
        return _BaseHead(names, f"the base's own head ({base_names[mismatched[0]]} {ours}) is not the candidates' "
                                f"({theirs}): it is treated as a base with no head")  # fmt: skip
    permutation, problem = _align_labels(labels, base) if base.label_names else (None, None)
    if problem:
        return _BaseHead(
            names, f"the base's head has other labels ({problem}): it is treated as a base with no head"
        )
    return _BaseHead(names, permutation=permutation)


def check_compatibility(
    base_dir: str | Path,
    patterns: list[str],
    allow_pickle: bool = False,
    label_order: list[str] | None = None,
    api=None,
    download: bool = True,
    trust_remote_code: bool = False,
) -> tuple[CompatibilityReport, dict[str, TensorSource]]:
    """Resolve `patterns`, then check every candidate against a reference and against the base.

    Only configs and tensor headers are read. Hub candidates that pass, and a Hub base, are then downloaded
    (`download=True`); with `download=False` nothing but configs and safetensors headers is fetched.

    Args:
        label_order (`list[str]`, *optional*): force this label order (used by `reproduce`).

    Returns:
        `(report, sources)`: the report, and an open `TensorSource` for the base and each accepted candidate.
    """
    from huggingface_hub import HfApi

    api = api or HfApi()
    base, base_source = resolve_base(
        str(base_dir), allow_pickle, api, trust_remote_code, download_weights=download
    )
    found, refused = gather_candidates(
        list(patterns), base, allow_pickle, api, trust_remote_code, base_source=base_source
    )

    accepted: list[Candidate] = []
    rejected: list[Rejection] = [Rejection(cid, reason) for cid, reason in refused]
    sources: dict[str, TensorSource] = {"__base__": base_source}
    permutations: dict[str, list[int]] = {}
    warnings: list[str] = []
    reference: Candidate | None = None
    reference_labels: list[str] | None = None
    readable = found

    if readable:
        # The reference is the first candidate of the most common kind, so one odd folder cannot reject the rest.
        kinds = Counter(_signature(c, s) for c, s in readable)
        top = max(kinds.values())
        reference, _ = next((c, s) for c, s in readable if kinds[_signature(c, s)] == top)
        sources[reference.id] = dict((c.id, s) for c, s in readable)[reference.id]
        reference_labels = (
            label_order
            or reference.label_names
            or next(
                (
                    c.label_names
                    for c, s in readable
                    if c.label_names
                    and _signature(c, s)[:3] == _signature(reference, sources[reference.id])[:3]
                ),
                None,
            )
        )

    tokenizers = (
        TokenizerCheck(base.local_dir if tokenizer_files(base.local_dir) else Path(reference.local_dir))
        if reference
        else None
    )
    for candidate, source in readable:
        assert reference is not None and tokenizers is not None
        if _architecture(candidate) != _architecture(reference):
            rejected.append(
                Rejection(
                    candidate.id,
                    f"architecture {candidate.model_type}/{','.join(candidate.architectures)} differs from "
                    f"{reference.model_type}/{','.join(reference.architectures)}",
                )
            )
            continue
        if candidate.num_labels != reference.num_labels:
            rejected.append(
                Rejection(candidate.id, f"{candidate.num_labels} labels, expected {reference.num_labels}")
            )
            continue
        problem = candidate is not reference and _compare_tensors(sources[reference.id], source)
        if problem and _ties_embeddings(candidate) != _ties_embeddings(reference):
            problem = (
                f"tie_word_embeddings is {_ties_embeddings(candidate)} but {_ties_embeddings(reference)} for the "
                f"reference {reference.id}: a tied and an untied output layer cannot be averaged ({problem})"
            )
        problem = problem or (candidate.source == "local" and tokenizers.problem(candidate.local_dir))
        if problem:
            rejected.append(Rejection(candidate.id, problem))
            continue
        permutation, label_problem = _align_labels(reference_labels, candidate)
        if label_problem:
            rejected.append(Rejection(candidate.id, label_problem))
            continue
        if permutation is not None:
            permutations[candidate.id] = permutation
        if candidate.label_names is None and reference_labels is not None:
            warnings.append(
                f"{candidate.id} has generic LABEL_k names; its label order is assumed to be {reference_labels}"
            )
        accepted.append(candidate)
        sources[candidate.id] = source
    # Keep the reference first: its config, label order and tensor names define the soup.
    accepted.sort(key=lambda c: c is not reference)
    if download:
        _download_hub_candidates(accepted, sources, allow_pickle, ["*.py"] if trust_remote_code else [])

    base_names: dict[str, str] = {}
    head: list[str] = []
    if accepted:
        reference_source = sources[accepted[0].id]
        base_names = _base_name_map(base_source, reference_source)
        if not base_names:
            raise IncompatibleCandidatesError(
                f"The base {base_dir} shares no tensor with the candidates: it is not their initialisation. "
                "Pass the pretrained model they were fine-tuned from as --base."
            )
        base_head = _base_head(base, base_source, reference_source, base_names, reference_labels)
        if base_head.dropped:
            warnings.append(base_head.dropped)
            base_names = {c: b for c, b in base_names.items() if c not in base_head.names}
        elif base_head.permutation is not None:
            permutations[BASE] = base_head.permutation
        for cand_name, base_name in base_names.items():
            if base_source.shape(base_name) != reference_source.shape(cand_name):
                raise IncompatibleCandidatesError(
                    f"The base {base_dir} has {base_name} of shape {list(base_source.shape(base_name))} but the "
                    f"candidates have {list(reference_source.shape(cand_name))}: pass the model they were "
                    "fine-tuned from as --base."
                )
        head = _head_tensors(reference_source, accepted[0].num_labels, base_names)
        dtypes = {str(sources[c.id].dtype(n)) for c in accepted for n in list(sources[c.id].keys())[:1]}
        if len(dtypes) > 1:
            warnings.append(
                f"candidates mix dtypes ({', '.join(sorted(dtypes))}); they are averaged in float32"
            )
    for message in warnings:
        logger.warning(message)
    report = CompatibilityReport(
        accepted=accepted,
        rejected=rejected,
        base=base,
        label_names=reference_labels,
        permutations=permutations,
        head_tensors=head,
        base_names=base_names,
        warnings=warnings,
    )
    return report, sources


def _download_hub_candidates(
    accepted: list[Candidate], sources: dict, allow_pickle: bool, extra_patterns: list[str]
) -> None:
    """Fetch the accepted Hub candidates at their pinned SHAs, and open their weights."""
    from .hub import WEIGHT_PATTERNS, HubRef
    from .hub import download as hub_download

    for candidate in accepted:
        if candidate.source == "hub" and candidate.kind == "full":  # adapters are small and already fetched
            ref = HubRef(candidate.id, candidate.revision)
            candidate.local_dir = hub_download(ref, [*WEIGHT_PATTERNS, *extra_patterns])
            sources[candidate.id] = TensorSource(candidate.local_dir, allow_pickle=allow_pickle)


def read_aligned(
    report: CompatibilityReport,
    source: TensorSource,
    candidate_id: str,
    name: str,
    stored_name: str | None = None,
) -> torch.Tensor:
    """Read one tensor of a candidate (or of the base, stored as `stored_name`), with its head rows in the
    reference label order."""
    tensor = source.get(stored_name or name)
    permutation = report.permutations.get(candidate_id)
    if permutation is not None and name in report.head_tensors:
        tensor = tensor[permutation]
    return tensor
