"""Stage 2: decide which candidates can be souped together, from configs and safetensors headers only.

No tensor data is read here. A candidate is rejected, with its reason, when its architecture, tensor names,
shapes or label set differ from the reference (the first readable candidate). Heads whose labels are the same
names in another order are accepted and permuted to the reference order when read.

A backbone soup (`soup="backbone"`) compares only the candidates' bodies (the tensors the base has, seen through
`BodyView`): their tasks, label sets and heads may differ, and the heads are left out.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..checkpoints.sources import HEAD_PARTS, Alignment, BodyView, SoupSources, TensorReader
from ..checkpoints.vocab import (
    TokenizerCheck,
    VocabAlignment,
    VocabMode,
    align_vocabularies,
    tokenizer_files,
    tokenizer_vocabulary,
    vocabulary_tensors,
)
from ..checkpoints.weights import TensorSource, averaged
from ..errors import IncompatibleCandidatesError, NoCandidatesError
from .discovery import Candidate, HubWeights, gather_candidates, resolve_base
from .hub import TOKENIZER_PATTERNS, WEIGHT_PATTERNS, HubRef, download

logger = logging.getLogger(__name__)

SoupKind = Literal["full", "backbone"]


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
    alignment: Alignment = field(default_factory=Alignment)  # shared with the `SoupSources`
    warnings: list[str] = field(default_factory=list)
    soup: SoupKind = "full"
    # Backbone soups: each candidate's tensors left out of the soup (its head), and its own label names.
    left_out: dict[str, list[str]] = field(default_factory=dict)
    ingredient_labels: dict[str, list[str] | None] = field(default_factory=dict)

    @property
    def permutations(self) -> dict[str, list[int]]:
        return self.alignment.permutations

    @property
    def head_tensors(self) -> list[str]:
        return self.alignment.head_tensors

    @property
    def base_names(self) -> dict[str, str]:
        return self.alignment.base_names

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
            if self.alignment.vocab is not None:
                details.append("embedding rows aligned by token")
            if self.left_out.get(candidate.id):
                names = self.left_out[candidate.id]
                details.append(
                    f"backbone: {len(names)} head tensor(s) left out ({', '.join(names[:3])}"
                    f"{', ...' if len(names) > 3 else ''}: not in the base)"
                )
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
            "architectures": list(self.accepted[0].architectures) if self.accepted else [],
            "permuted": sorted(self.permutations),
            "lora": [c.id for c in self.accepted if c.kind == "lora"],
            "hub": [
                c.id for c in self.accepted if c.source == "hub"
            ],  # the card's `base_model` lists only these
            "base_on_hub": self.base.source == "hub",
            "vocab": self.alignment.vocab.to_dict() if self.alignment.vocab else None,
            "warnings": self.warnings,
            "soup": self.soup,
            **(
                {"left_out": self.left_out, "ingredient_labels": self.ingredient_labels}
                if self.soup == "backbone"
                else {}
            ),
        }


def _architecture(candidate: Candidate, backbone: bool = False) -> tuple:
    """What must match: the model type and class; a backbone soup's candidates may have other task classes."""
    return (candidate.model_type,) if backbone else (candidate.model_type, candidate.architectures)


def _describe_names(missing: set[str], extra: set[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s), e.g. {sorted(missing)[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected tensor(s), e.g. {sorted(extra)[0]}")
    return "; ".join(parts)


def _compare_tensors(
    reference: TensorReader, other: TensorReader, vocabulary: set[str] = frozenset()
) -> str | None:
    """Why `other`'s tensors cannot be averaged with `reference`'s; rows of `vocabulary` tensors may differ in
    number (they are aligned by token string, `vocab.py`)."""
    ref_names, other_names = set(reference.keys()), set(other.keys())
    if ref_names != other_names:
        return f"tensor names differ: {_describe_names(ref_names - other_names, other_names - ref_names)}"
    for name in reference.keys():
        if name in vocabulary and reference.shape(name)[1:] == other.shape(name)[1:]:
            continue
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


def _signature(candidate: Candidate, source: TensorReader, backbone: bool = False) -> tuple:
    tensors = tuple(sorted((n, source.shape(n), averaged(source.dtype(n))) for n in source.keys()))
    if backbone:  # bodies only: labels and heads may differ
        return (_architecture(candidate, True), None, tensors, None)
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


def _base_name_map(base: TensorReader, candidate: TensorReader) -> dict[str, str]:
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


def _head_tensors(source: TensorReader, num_labels: int, base_names: dict[str, str]) -> list[str]:
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
    base_source: TensorReader,
    reference_source: TensorReader,
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
        return _BaseHead(
            names,
            f"the base's own head ({base_names[mismatched[0]]} {ours}) is not the candidates' "
            f"({theirs}): it is treated as a base with no head",
        )
    permutation, problem = _align_labels(labels, base) if base.label_names else (None, None)
    if problem:
        return _BaseHead(
            names, f"the base's head has other labels ({problem}): it is treated as a base with no head"
        )
    return _BaseHead(names, permutation=permutation)


def _screened(found, refused, base, label_order, soup: SoupKind) -> tuple[CompatibilityReport, _Screening]:
    """Every found candidate screened against the reference and the base; those refused earlier stay rejected."""
    screening = _Screening(found, label_order, base, soup == "backbone")
    for candidate, source in found:
        screening.screen(candidate, source)
    rejected = [*(Rejection(cid, reason) for cid, reason in refused), *screening.rejected]
    alignment = Alignment(permutations=screening.permutations)
    report = CompatibilityReport(
        screening.accepted,
        rejected,
        base,
        screening.labels,
        alignment,
        warnings=screening.warnings,
        soup=soup,
    )
    return report, screening


def check_compatibility(
    base_dir: str | Path,
    patterns: list[str],
    *,
    allow_pickle: bool = False,
    label_order: list[str] | None = None,
    api=None,
    hub_weights: HubWeights = "download",
    trust_remote_code: bool = False,
    vocab: VocabMode = "base",
    soup: SoupKind = "full",
) -> tuple[CompatibilityReport, SoupSources]:
    """Resolve `patterns`, then check every candidate against a reference and against the base.

    Only configs and tensor headers are read. Then, by `hub_weights`, Hub candidates that pass and a Hub base are
    downloaded (`"download"`); or read by HTTP Range requests when a tensor is needed (`"stream"`: the base's
    tokenizer files are downloaded, no weights); or left as headers (`"headers"`: `hf-soup check`).

    Args:
        label_order (`list[str]`, *optional*): force this label order (used by `reproduce`).
        vocab (`str`, *optional*, defaults to `"base"`): the soup's vocabulary when candidates' embedding rows
            differ from the base's: the base's (`"base"`), or with every added token (`"union"`); see `vocab.py`.
        soup (`str`, *optional*, defaults to `"full"`): `"backbone"` compares and soups only the tensors the base
            has; the candidates' tasks, labels and heads may differ.

    Returns:
        `(report, sources)`: the report, and the open weights of the base and of each accepted candidate.
    """
    from huggingface_hub import HfApi

    api = api or HfApi()
    base, base_source = resolve_base(str(base_dir), allow_pickle, api, trust_remote_code, hub_weights)
    found, refused = gather_candidates(
        list(patterns), base, allow_pickle, api, trust_remote_code, base_source=base_source
    )
    backbone = soup == "backbone"  # then bodies are what is compared and souped
    found = [(c, body_of(base_source, s)) for c, s in found] if backbone else found
    report, screening = _screened(found, refused, base, label_order, soup)
    readers = {c.id: screening.readers[c.id] for c in report.accepted}
    if hub_weights != "headers":
        _fetch_hub_candidates(report.accepted, readers, allow_pickle, trust_remote_code, hub_weights)
    readers = _bodies(report, readers, base_source) if backbone else readers
    if report.accepted:
        _align_with_base(report, base_source, readers[report.accepted[0].id], str(base_dir))
        report.alignment.vocab = _plan_vocabulary(report, base_source, readers, screening.tokenizers, vocab)
        report.warnings.extend(_dtype_warnings(readers))
    for message in report.warnings:
        logger.warning(message)
    return report, SoupSources(base.id, base_source, readers, report.alignment)


class _Screening:
    """Checks candidates one by one against the reference: the first candidate of the most common kind, so one
    odd folder cannot reject the rest."""

    def __init__(
        self,
        found: list[tuple[Candidate, TensorReader]],
        label_order,
        base: Candidate,
        backbone: bool = False,
    ):
        self.backbone = backbone
        self.accepted: list[Candidate] = []
        self.rejected: list[Rejection] = []
        self.readers: dict[str, TensorReader] = {}
        self.permutations: dict[str, list[int]] = {}
        self.warnings: list[str] = []
        self.reference: Candidate | None = None
        self.labels: list[str] | None = None
        if not found:
            return
        kinds = Counter(_signature(c, s, backbone) for c, s in found)
        top = max(kinds.values())
        self.reference, self.reference_source = next(
            (c, s) for c, s in found if kinds[_signature(c, s, backbone)] == top
        )
        shape = _signature(self.reference, self.reference_source)[:3]
        same_shape = (c.label_names for c, s in found if c.label_names and _signature(c, s)[:3] == shape)
        # A backbone soup's labels are the target task's, set when its head is built.
        self.labels = (
            None if backbone else label_order or self.reference.label_names or next(same_shape, None)
        )
        folder = base.local_dir if tokenizer_files(base.local_dir) else Path(self.reference.local_dir)
        self.tokenizers = TokenizerCheck(folder)

    def screen(self, candidate: Candidate, source: TensorReader) -> None:
        problem, permutation = self._problem(candidate, source)
        if problem:
            self.rejected.append(Rejection(candidate.id, problem))
            return
        if permutation is not None:
            self.permutations[candidate.id] = permutation
        if candidate.label_names is None and self.labels is not None and not self.backbone:
            self.warnings.append(
                f"{candidate.id} has generic LABEL_k names; its label order is assumed to be {self.labels}"
            )
        # Keep the reference first: its config, label order and tensor names define the soup.
        self.accepted.insert(0, candidate) if candidate is self.reference else self.accepted.append(candidate)
        self.readers[candidate.id] = source

    def _problem(self, candidate: Candidate, source: TensorReader) -> tuple[str | None, list[int] | None]:
        reference = self.reference
        if _architecture(candidate, self.backbone) != _architecture(reference, self.backbone):
            return (
                f"architecture {candidate.model_type}/{','.join(candidate.architectures)} differs from "
                f"{reference.model_type}/{','.join(reference.architectures)}"
            ), None
        if self.backbone and not source.keys():
            return "it shares no tensor with the base: it was not fine-tuned from it", None
        if candidate.num_labels != reference.num_labels and not self.backbone:
            return f"{candidate.num_labels} labels, expected {reference.num_labels}", None
        vocabulary = set(vocabulary_tensors(self.reference_source, reference.config)) & set(
            vocabulary_tensors(source, candidate.config)
        )
        problem = candidate is not reference and _compare_tensors(self.reference_source, source, vocabulary)
        if problem and self.backbone:
            problem = f"its body differs from {reference.id}'s: {problem}"
        if problem and _ties_embeddings(candidate) != _ties_embeddings(reference):
            problem = (
                f"tie_word_embeddings is {_ties_embeddings(candidate)} but {_ties_embeddings(reference)} for the "
                f"reference {reference.id}: a tied and an untied output layer cannot be averaged ({problem})"
            )
        problem = problem or (candidate.source == "local" and self.tokenizers.problem(candidate.local_dir))
        if problem:
            return problem, None
        permutation, label_problem = _align_labels(self.labels, candidate)
        return label_problem, permutation


def _bodies(report: CompatibilityReport, readers: dict[str, TensorReader], base: TensorReader):
    """A backbone soup's readers, each candidate's body (downloaded Hub candidates were opened anew), and what the
    report records: each one's left-out tensors and labels."""
    readers = {cid: r if isinstance(r, BodyView) else body_of(base, r) for cid, r in readers.items()}
    report.left_out = {cid: reader.left_out() for cid, reader in readers.items()}
    report.ingredient_labels = {c.id: c.label_names for c in report.accepted}
    return readers


def body_of(base: TensorReader, candidate: TensorReader) -> BodyView:
    """The candidate's tensors that the base has too (allowing for the task model's prefix), minus any head."""
    names = _base_name_map(base, candidate)
    return BodyView(
        candidate, [n for n in candidate.keys() if n in names and not HEAD_PARTS & set(n.split(".")[:-1])]
    )


def _align_with_base(
    report: CompatibilityReport, base_source: TensorReader, reference_source: TensorReader, base_dir: str
) -> None:
    """Map the reference's tensor names to the base's, decide what to do with a base's own head, and find the
    head tensors (the ones whose rows follow the labels)."""
    alignment = report.alignment
    base_names = _base_name_map(base_source, reference_source)
    if not base_names:
        raise IncompatibleCandidatesError(
            f"The base {base_dir} shares no tensor with the candidates: it is not their initialisation. "
            "Pass the pretrained model they were fine-tuned from as --base."
        )
    base_head = _base_head(report.base, base_source, reference_source, base_names, report.label_names)
    if base_head.dropped:
        report.warnings.append(base_head.dropped)
        base_names = {c: b for c, b in base_names.items() if c not in base_head.names}
    else:
        alignment.base_permutation = base_head.permutation
    vocabulary = set(vocabulary_tensors(reference_source, report.accepted[0].config))
    for cand_name, base_name in base_names.items():
        ours, theirs = base_source.shape(base_name), reference_source.shape(cand_name)
        if ours != theirs and not (cand_name in vocabulary and ours[1:] == theirs[1:]):
            raise IncompatibleCandidatesError(
                f"The base {base_dir} has {base_name} of shape {list(base_source.shape(base_name))} but the "
                f"candidates have {list(reference_source.shape(cand_name))}: pass the model they were "
                "fine-tuned from as --base."
            )
    alignment.base_names = base_names
    alignment.head_tensors = _head_tensors(reference_source, report.accepted[0].num_labels, base_names)


def _plan_vocabulary(
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


def _dtype_warnings(readers: dict[str, TensorReader]) -> list[str]:
    dtypes = {str(reader.dtype(n)) for reader in readers.values() for n in list(reader.keys())[:1]}
    if len(dtypes) > 1:
        return [f"candidates mix dtypes ({', '.join(sorted(dtypes))}); they are averaged in float32"]
    return []


def _fetch_hub_candidates(
    accepted: list[Candidate],
    readers: dict[str, TensorReader],
    allow_pickle: bool,
    trust_remote_code: bool,
    hub_weights: HubWeights,
) -> None:
    """Fetch the accepted Hub candidates at their pinned SHAs and open their weights; streamed, their readers
    stay the Range readers opened for the check, and only trusted custom code is downloaded."""
    code = ["*.py"] if trust_remote_code else []
    for candidate in accepted:
        if candidate.source == "hub" and candidate.kind == "full":  # adapters are small and already fetched
            ref = HubRef(candidate.id, candidate.revision)
            if hub_weights == "stream":  # their tokenizers, to align vocabularies; the weights stay remote
                candidate.local_dir = download(ref, ["config.json", *TOKENIZER_PATTERNS, *code])
                continue
            candidate.local_dir = download(ref, [*WEIGHT_PATTERNS, *TOKENIZER_PATTERNS, *code])
            readers[candidate.id] = TensorSource(candidate.local_dir, allow_pickle=allow_pickle)
