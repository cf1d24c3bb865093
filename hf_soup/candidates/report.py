"""The compatibility report: which candidates passed the check, which did not and why, and how their heads,
labels and vocabularies are aligned. `compat.check_compatibility` makes it; the table, `soup.json` and `reproduce`
read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..checkpoints.sources import Alignment
from ..errors import IncompatibleCandidatesError, NoCandidatesError
from .discovery import Candidate

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
    # Every candidate found, in the order --candidates named them (per-model options follow it).
    given_order: list[str] = field(default_factory=list)

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
