"""Stage 1: turn the user's patterns into `Candidate`s (config and label map read, no tensor data).

Local patterns are folders or globs (`./runs/*`, `out/checkpoint-*`). Trainer checkpoint folders work as they
are: their optimizer, scheduler and RNG files are never opened.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from huggingface_hub.constants import CONFIG_NAME

from ..checkpoints.lora import check_adapter, is_adapter_folder, open_lora_candidate, read_adapter_config
from ..checkpoints.weights import TensorSource
from ..errors import CandidateFormatError, HubError, NoCandidatesError
from .hub import (
    ADAPTER_PATTERNS,
    TOKENIZER_PATTERNS,
    WEIGHT_PATTERNS,
    HubRef,
    derives_from,
    download,
    expand,
    fetch_config,
    is_hub_pattern,
    not_a_folder_nor_a_repo,
    open_remote,
    pin,
    split_revision,
)

# How Hub weights are read: downloaded, streamed by HTTP Range requests, or headers only (`hf-soup check`).
HubWeights = Literal["download", "stream", "headers"]
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
        kind (`str`, *optional*, defaults to `"full"`): `"full"`, or `"lora"` for a PEFT LoRA adapter, whose
            `config` is then that of the model it merges into.
    """

    id: str
    local_dir: Path
    config: dict[str, Any] = field(repr=False)
    source: str = "local"
    revision: str | None = None
    kind: str = "full"

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
        raise CandidateFormatError(
            f"{folder} has no {CONFIG_NAME}; it is not a transformers model folder (nor a PEFT adapter: no "
            "adapter_config.json)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CandidateFormatError(f"{path} is not valid JSON ({error}); fix or re-download it.") from error


def load_candidate(path: str | Path, candidate_id: str | None = None) -> Candidate:
    folder = Path(path)
    return Candidate(id=candidate_id or str(path), local_dir=folder, config=read_config(folder))


def resolve_patterns(
    patterns: list[str], exclude: list[Path] | None = None, allow_empty: bool = False
) -> list[str]:
    """Expand folder paths and globs into a sorted, de-duplicated list of folders.

    Raises:
        NoCandidatesError: no pattern matched a folder.
    """
    excluded = {Path(p).resolve() for p in exclude or []}
    found: dict[Path, str] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        if not glob.has_magic(expanded) and Path(expanded).is_file():
            raise NoCandidatesError(
                f"{pattern} is a file; pass the model folder that holds it ({Path(pattern).parent}), as written "
                "by `save_pretrained`."
            )
        for match in matches:
            resolved = Path(match).resolve()
            if Path(match).is_dir() and resolved not in excluded and resolved not in found:
                found[resolved] = match
    if not found and not allow_empty:
        raise NoCandidatesError(
            f"No candidate folder matches {' '.join(patterns)}. Pass model folders or globs such as "
            "'./runs/*' or 'out/checkpoint-*' (quote globs so the shell does not expand them)."
        )
    return sorted(found.values())


def given_order(patterns: list[str], ids: list[str]) -> list[str]:
    """`ids` in the order `patterns` name them (a glob's matches among themselves as they are): the order that
    per-model options such as `--weights 0.6,0.4` follow."""

    def named_by(cid: str, pattern: str) -> bool:
        expanded = os.path.expanduser(split_revision(pattern)[0] if is_hub_pattern(pattern) else pattern)
        if cid == expanded or fnmatch.fnmatchcase(cid, expanded):
            return True
        return os.path.exists(cid) and os.path.exists(expanded) and os.path.samefile(cid, expanded)

    def first(cid: str) -> int:
        return next((i for i, pattern in enumerate(patterns) if named_by(cid, pattern)), len(patterns))

    return sorted(ids, key=first)


def split_patterns(patterns: list[str]) -> tuple[list[str], list[str]]:
    """`(local, hub)` patterns. A local folder or glob that matches something wins over a Hub id of that name."""
    local, hub = [], []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.glob(expanded) or not is_hub_pattern(pattern):
            local.append(pattern)
        else:
            hub.append(pattern)
    return local, hub


def gather_candidates(
    patterns: list[str],
    base: Candidate,
    allow_pickle: bool = False,
    api=None,
    trust_remote_code: bool = False,
    base_source=None,
) -> tuple[list[tuple[Candidate, Any]], list[tuple[str, str]]]:
    """Stage 1: every candidate's config and tensor headers, local or Hub, without reading tensor data.

    Hub revisions are pinned to commit SHAs first; when `base` is a Hub model, Hub candidates must declare it
    (card `base_model` or config `_name_or_path`). PEFT LoRA adapters must name `base` in `adapter_config.json`
    (checked before anything else is fetched or opened) and are presented as the models they merge into
    (`base_source` supplies the base's tensors).

    Returns:
        `(readable, rejected)`: `(candidate, headers)` pairs, and `(id, reason)` pairs.
    """
    local, hub = split_patterns(patterns)
    readable: list[tuple[Candidate, Any]] = []
    rejected: list[tuple[str, str]] = []
    matches = resolve_patterns(local, exclude=[base.local_dir], allow_empty=bool(hub)) if local else []
    for match in matches:
        try:
            if is_adapter_folder(Path(match)):
                readable.append(_lora_candidate(match, Path(match), base, base_source))
                continue
            candidate = load_candidate(match)
            _refuse_custom_code(candidate, trust_remote_code)
            readable.append((candidate, TensorSource(candidate.local_dir, allow_pickle=allow_pickle)))
        except CandidateFormatError as error:
            rejected.append((match, str(error).removeprefix(f"{match} ")))
    refs = [(repo_id, rev) for pattern in hub for repo_id, rev in expand(pattern, api)]
    refs = [(r, v) for r, v in dict.fromkeys(refs) if r != base.id]
    for repo_id, revision in refs:
        ref = _pinned(repo_id, revision, api, "--candidates", could_be_folder=repo_id in hub)
        try:
            folder = fetch_config(ref)
            if is_adapter_folder(folder):  # adapter_config.json only, so far: checked before any weights come
                check_adapter(read_adapter_config(folder), base.id, base.local_dir)
                folder = download(ref, ADAPTER_PATTERNS)
                readable.append(_lora_candidate(repo_id, folder, base, base_source, "hub", ref.sha))
                continue
            candidate = Candidate(repo_id, folder, read_config(folder), source="hub", revision=ref.sha)
            _refuse_custom_code(candidate, trust_remote_code)
            if base.source == "hub" and not derives_from(ref, candidate.config, base.id):
                raise CandidateFormatError(f"does not declare {base.id} as its base_model (card or config)")
            readable.append((candidate, open_remote(ref, api)))
        except CandidateFormatError as error:
            rejected.append((repo_id, str(error)))
    if not readable and not rejected:
        raise NoCandidatesError(
            f"No candidate matches {' '.join(patterns)}. Pass model folders, globs such as './runs/*', or Hub "
            "patterns such as 'org/*' (quote globs so the shell does not expand them)."
        )
    return readable, rejected


def _lora_candidate(cid: str, folder: Path, base: Candidate, base_source, source="local", revision=None):
    """A LoRA adapter as a candidate: the merged model's config, and its tensors read through the base."""
    config, tensors = open_lora_candidate(folder, base, base_source)
    return Candidate(cid, folder, config, source=source, revision=revision, kind="lora"), tensors


def _refuse_custom_code(candidate: Candidate, trust_remote_code: bool) -> None:
    """Models whose config maps to custom code (`auto_map`) run that code when loaded: refused unless trusted."""
    if candidate.config.get("auto_map") and not trust_remote_code:
        raise CandidateFormatError(
            "its config uses custom code (auto_map), which would run when loaded; pass --trust-remote-code "
            "only if you have read that code and trust it"
        )


def resolve_base(
    base: str,
    allow_pickle: bool = False,
    api=None,
    trust_remote_code: bool = False,
    hub_weights: HubWeights = "download",
) -> tuple[Candidate, Any]:
    """The base model, local or on the Hub, with its tensors. A Hub base is downloaded whole (`"download"`: its
    tokenizer is the soup's, its weights anchor the diagnostics), or with its tokenizer files and its weights read
    by range (`"stream"`), or read by range with nothing but its config stored (`"headers"`: `hf-soup check`)."""
    if Path(base).is_file():
        raise CandidateFormatError(
            f"--base {base} is a file; pass the pretrained model's folder ({Path(base).parent}), with its config.json."
        )
    if Path(base).is_dir() or not is_hub_pattern(base):
        candidate = _checked_base(load_candidate(base), trust_remote_code)
        return candidate, TensorSource(candidate.local_dir, allow_pickle=allow_pickle)
    repo_id, revision = split_revision(base)
    ref = _pinned(repo_id, revision, api, "--base", could_be_folder=revision is None)
    if hub_weights != "download":
        folder = (
            fetch_config(ref)
            if hub_weights == "headers"
            else download(ref, ["config.json", *TOKENIZER_PATTERNS])
        )
        candidate = Candidate(repo_id, folder, read_config(folder), source="hub", revision=ref.sha)
        return _checked_base(candidate, trust_remote_code), open_remote(ref, api)
    folder = download(ref, [*WEIGHT_PATTERNS, *TOKENIZER_PATTERNS])
    candidate = _checked_base(
        Candidate(repo_id, folder, read_config(folder), source="hub", revision=ref.sha), trust_remote_code
    )
    return candidate, TensorSource(folder, allow_pickle=allow_pickle)


def _pinned(repo_id: str, revision: str | None, api, flag: str, could_be_folder: bool):
    """`hub.pin`, with an error that names the missing local folder too when `repo_id` was typed as one might
    type a relative path."""
    try:
        return pin(repo_id, revision, api)
    except HubError as error:
        if could_be_folder:
            raise not_a_folder_nor_a_repo(flag, repo_id, error) from error
        raise


def _checked_base(candidate: Candidate, trust_remote_code: bool) -> Candidate:
    try:
        _refuse_custom_code(candidate, trust_remote_code)
    except CandidateFormatError as error:
        raise CandidateFormatError(f"The base {candidate.id}: {error}.") from error
    return candidate


def fetch_accepted(
    accepted: list[Candidate],
    readers: dict[str, Any],
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
