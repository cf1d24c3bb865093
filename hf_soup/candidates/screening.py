"""Screen candidates against a reference, from configs and tensor headers only: architecture, label set, tensor
names, shapes and dtypes, tied embeddings and tokenizer files. The reference is the first candidate of the most
common kind, so one odd folder cannot reject the rest; heads whose labels are the same names in another order are
accepted and permuted to the reference order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..checkpoints.sources import Alignment, TensorReader
from ..checkpoints.vocab import TokenizerCheck, tokenizer_files, vocabulary_tensors
from ..checkpoints.weights import averaged
from .discovery import Candidate
from .report import CompatibilityReport, Rejection, SoupKind


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


def align_labels(reference: list[str] | None, candidate: Candidate) -> tuple[list[int] | None, str | None]:
    """The row permutation that maps `candidate`'s head onto `reference`'s label order, or a rejection."""
    names = candidate.label_names
    if reference is None or names is None:
        return None, None
    if sorted(names) != sorted(reference):
        return None, f"label set {names} differs from the reference {reference}"
    if names == reference:
        return None, None
    return [names.index(label) for label in reference], None


class Screening:
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
        permutation, label_problem = align_labels(self.labels, candidate)
        return label_problem, permutation


def screen_candidates(
    found, refused, base, label_order, soup: SoupKind
) -> tuple[CompatibilityReport, Screening]:
    """Every found candidate screened against the reference and the base; those refused earlier stay rejected."""
    screening = Screening(found, label_order, base, soup == "backbone")
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
