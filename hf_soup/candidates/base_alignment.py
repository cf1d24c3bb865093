"""Line the candidates up with the base: map tensor names across the task model's prefix (`bert.` etc.), decide
what a base's own head is worth, find the head tensors whose rows follow the labels, and cut a backbone soup's
candidates down to their bodies (the tensors the base has)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..checkpoints.sources import HEAD_PARTS, BodyView, TensorReader
from ..checkpoints.vocab import vocabulary_tensors
from ..checkpoints.weights import averaged
from ..errors import IncompatibleCandidatesError
from .discovery import Candidate
from .report import CompatibilityReport
from .screening import align_labels


def base_name_map(base: TensorReader, candidate: TensorReader) -> dict[str, str]:
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
    permutation, problem = align_labels(labels, base) if base.label_names else (None, None)
    if problem:
        return _BaseHead(
            names, f"the base's head has other labels ({problem}): it is treated as a base with no head"
        )
    return _BaseHead(names, permutation=permutation)


def align_with_base(
    report: CompatibilityReport, base_source: TensorReader, reference_source: TensorReader, base_dir: str
) -> None:
    """Map the reference's tensor names to the base's, decide what to do with a base's own head, and find the
    head tensors (the ones whose rows follow the labels)."""
    alignment = report.alignment
    base_names = base_name_map(base_source, reference_source)
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


def body_of(base: TensorReader, candidate: TensorReader) -> BodyView:
    """The candidate's tensors that the base has too (allowing for the task model's prefix), minus any head."""
    names = base_name_map(base, candidate)
    return BodyView(
        candidate, [n for n in candidate.keys() if n in names and not HEAD_PARTS & set(n.split(".")[:-1])]
    )


def bodies_of(report: CompatibilityReport, readers: dict[str, TensorReader], base: TensorReader):
    """A backbone soup's readers, each candidate's body (downloaded Hub candidates were opened anew), and what the
    report records: each one's left-out tensors and labels."""
    readers = {cid: r if isinstance(r, BodyView) else body_of(base, r) for cid, r in readers.items()}
    report.left_out = {cid: reader.left_out() for cid, reader in readers.items()}
    report.ingredient_labels = {c.id: c.label_names for c in report.accepted}
    return readers
