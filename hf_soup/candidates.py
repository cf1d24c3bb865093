"""Stage 1: turn the user's patterns into `Candidate`s (config and label map read, no tensor data).

Local patterns are folders or globs (`./runs/*`, `out/checkpoint-*`). Trainer checkpoint folders work as they
are: their optimizer, scheduler and RNG files are never opened.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import CONFIG_NAME

from .errors import CandidateFormatError, NoCandidatesError

_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


@dataclass
class Candidate:
    """One model that may go into the soup.

    Args:
        id (`str`): the name the user gave it (a path as typed, or a Hub id).
        local_dir (`Path`): where its files are.
        config (`dict`): its `config.json`.
        source (`str`, *optional*, defaults to `"local"`): `"local"` or `"hub"`.
        revision (`str`, *optional*): the commit SHA, for Hub candidates.
    """

    id: str
    local_dir: Path
    config: dict[str, Any] = field(repr=False)
    source: str = "local"
    revision: str | None = None

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def architectures(self) -> tuple[str, ...]:
        return tuple(self.config.get("architectures") or ())

    @property
    def num_labels(self) -> int:
        if "id2label" in self.config:
            return len(self.config["id2label"])
        return int(self.config.get("num_labels", 2))

    @property
    def label_names(self) -> list[str] | None:
        """Label names in id order, or `None` when they are the generic `LABEL_k`."""
        id2label = self.config.get("id2label")
        if not id2label:
            return None
        names = [str(id2label[key]) for key in sorted(id2label, key=int)]
        return None if all(_GENERIC_LABEL.match(name) for name in names) else names


def read_config(folder: Path) -> dict[str, Any]:
    """Read `config.json` as plain JSON: no model code is imported or run."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        hint = ""
        if (folder / "adapter_config.json").is_file():
            hint = " It holds a PEFT adapter; merge it first with `model.merge_and_unload().save_pretrained(dir)`."
        raise CandidateFormatError(
            f"{folder} has no {CONFIG_NAME}; it is not a transformers model folder.{hint}"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CandidateFormatError(f"{path} is not valid JSON ({error}); fix or re-download it.") from error


def load_candidate(path: str | Path, candidate_id: str | None = None) -> Candidate:
    folder = Path(path)
    return Candidate(id=candidate_id or str(path), local_dir=folder, config=read_config(folder))


def resolve_patterns(patterns: list[str], exclude: list[Path] | None = None) -> list[str]:
    """Expand folder paths and globs into a sorted, de-duplicated list of folders.

    Raises:
        NoCandidatesError: no pattern matched a folder.
    """
    excluded = {Path(p).resolve() for p in exclude or []}
    found: dict[Path, str] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        for match in matches:
            resolved = Path(match).resolve()
            if Path(match).is_dir() and resolved not in excluded and resolved not in found:
                found[resolved] = match
    if not found:
        raise NoCandidatesError(
            f"No candidate folder matches {' '.join(patterns)}. Pass model folders or globs such as "
            "'./runs/*' or 'out/checkpoint-*' (quote globs so the shell does not expand them)."
        )
    return sorted(found.values())


def collect_candidates(patterns: list[str], exclude: list[Path] | None = None) -> list[Candidate]:
    """Resolve `patterns` and read each match's config (never its weights)."""
    return [load_candidate(match) for match in resolve_patterns(patterns, exclude)]
