"""The Hub side of stage 1 and the push at the end, all through the unmodified `huggingface_hub` client.

- Patterns `org/*`, `org/prefix-*`, `org/name` and `org/name@revision` are expanded with
  `HfApi.list_models(author=org)` plus `fnmatch`, and every revision is pinned to a commit SHA first.
- Before any weight byte is fetched, each candidate's `config.json` and safetensors *headers* (HTTP Range
  requests, `ranged.HubTensorSource`) are read, so incompatibilities show up first.
- Accepted candidates are then fetched with `snapshot_download(allow_patterns=...)` at their pinned SHA, or, with
  `--stream`, read tensor by tensor with Range requests and never stored.
- With `HF_HUB_OFFLINE=1`, everything resolves from the local cache (globs through `scan_cache_dir`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..checkpoints.ranged import HubTensorSource
from ..checkpoints.weights import TensorSource
from ..errors import CandidateFormatError, HfSoupError, HubError

# Files a soup ingredient needs; never optimizer states, pickles or other frameworks' weights.
WEIGHT_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json"]
TOKENIZER_PATTERNS = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
]
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "config.json", *TOKENIZER_PATTERNS]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-*?\[\]]+)?$")


@dataclass(frozen=True)
class HubRef:
    """A Hub model pinned to one commit."""

    repo_id: str
    sha: str
    card_data: dict[str, Any] | None = None


def split_revision(pattern: str) -> tuple[str, str | None]:
    repo, _, revision = pattern.partition("@")
    return repo, revision or None


def is_hub_pattern(pattern: str) -> bool:
    """True for `org/name`, `org/*`, `name@rev`: not an existing local path, and shaped like a repo id."""
    if os.path.exists(pattern) or pattern.startswith((".", "/", "~")):
        return False
    repo, _ = split_revision(pattern)
    return bool(_HUB_ID.match(repo)) and not (glob.has_magic(repo) and "/" not in repo)


@contextlib.contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn `huggingface_hub` errors into one clear `HubError` line."""
    try:
        yield
    except HfSoupError:
        raise
    except GatedRepoError as error:
        raise HubError(f"{what}: the repo is gated; accept its terms on the Hub and set HF_TOKEN.") from error
    except RepositoryNotFoundError as error:
        raise HubError(
            f"{what}: repository not found. It must be a model repo (not a dataset or Space); if it is private, "
            "set HF_TOKEN (or run `hf auth login`) with a token that can read it."
        ) from error
    except RevisionNotFoundError as error:
        raise HubError(f"{what}: no such revision; check the part after '@'.") from error
    except LocalEntryNotFoundError as error:
        raise HubError(
            f"{what}: not in the local cache and HF_HUB_OFFLINE is set. Run once online to warm the cache."
        ) from error
    except HFValidationError as error:
        raise HubError(f"{what}: {error}") from error
    except RuntimeError as error:
        if "Error while uploading" not in str(error):  # how huggingface_hub reports a failed LFS upload
            raise
        cause = error.__cause__ or error
        raise HubError(
            f"{what}: an upload failed ({type(cause).__name__}), so nothing was committed. Check your connection "
            "and push again (`hf-soup push FOLDER --to REPO`)."
        ) from error
    except ValueError as error:
        # huggingface_hub's path-traversal guard; any other ValueError is a bug and propagates.
        if "Invalid filename" not in str(error):
            raise
        raise HubError(
            f"{what}: the repo holds an unsafe file name and was not downloaded. {error}"
        ) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        hint = " Check HF_TOKEN: it must be allowed to write there." if status in (401, 403) else ""
        raise HubError(f"{what}: the Hub answered HTTP {status}.{hint}".rstrip()) from error
    except Exception as error:
        if not isinstance(error, OSError) and not _is_transport_error(error):
            raise
        raise HubError(
            f"{what}: the Hub could not be reached ({error}). Check your connection, or set HF_HUB_OFFLINE=1 to "
            "use the cache."
        ) from error


def _is_transport_error(error: Exception) -> bool:
    """A connection failure raised by huggingface_hub's HTTP client (httpx in 1.x, httpx2 in 2.x; both name
    their base class `TransportError`), matched by name so that neither is imported here."""
    return any(cls.__name__ == "TransportError" for cls in type(error).__mro__)


def _cached_repo_ids(namespace: str) -> list[str]:
    try:
        cache = scan_cache_dir()
    except Exception:  # an empty or missing cache folder
        return []
    return [
        r.repo_id for r in cache.repos if r.repo_type == "model" and r.repo_id.startswith(namespace + "/")
    ]


def expand(pattern: str, api: HfApi) -> list[tuple[str, str | None]]:
    """`org/*`-style patterns → `[(repo_id, revision)]`; plain ids pass through."""
    repo, revision = split_revision(pattern)
    if not glob.has_magic(repo):
        return [(repo, revision)]
    namespace = repo.split("/")[0]
    with hub_errors(f"Listing models of {namespace}"):
        if constants.HF_HUB_OFFLINE:
            ids = _cached_repo_ids(namespace)
        else:
            ids = [model.id for model in api.list_models(author=namespace)]
    return [(repo_id, revision) for repo_id in sorted(ids) if fnmatch.fnmatchcase(repo_id, repo)]


def pin(repo_id: str, revision: str | None, api: HfApi) -> HubRef:
    """Resolve `revision` (default `main`) to a commit SHA, and read the card metadata.

    Online, one `model_info` request comes first: a repo that does not exist, or a Hub that cannot be reached,
    fails at once instead of after `hf_hub_download`'s retries. `config.json` (a PEFT adapter's
    `adapter_config.json`) is then downloaded at `revision`, which records the branch in the local cache, so the
    same command works later with `HF_HUB_OFFLINE=1`.
    """
    what = f"{repo_id}@{revision}" if revision else repo_id
    with hub_errors(what):
        info = None if constants.HF_HUB_OFFLINE else api.model_info(repo_id, revision=revision)
        sha = None
        for name in ("config.json", "adapter_config.json"):
            try:
                sha = Path(hf_hub_download(repo_id, name, revision=revision)).parent.name
                break
            except LocalEntryNotFoundError:  # offline, and not cached: a subclass of EntryNotFoundError
                raise
            except EntryNotFoundError:
                continue
        if sha is None:
            raise HubError(
                f"{what} has neither config.json nor adapter_config.json; it is not a transformers model or PEFT "
                "adapter repo."
            )
        if info is None:
            return HubRef(repo_id, sha, _cached_card_data(repo_id, sha))
        if info.sha != sha:  # the branch moved between the two requests: describe the commit downloaded
            info = api.model_info(repo_id, revision=sha)
        with contextlib.suppress(EntryNotFoundError):  # cached for offline reruns
            hf_hub_download(repo_id, "README.md", revision=sha)
        return HubRef(repo_id, sha, info.card_data.to_dict() if info.card_data else None)


def not_a_folder_nor_a_repo(flag: str, name: str, error: HubError) -> HubError:
    """`name` is no local folder and the Hub has no such repo (or could not be asked): say both, since
    `inputs/base` is as much a relative path as a repo id."""
    return HubError(
        f"{error} Nor is there a folder {name} in {Path.cwd()} (as a path, {flag} is relative to the current "
        "folder): check the path or the repo id."
    )


def _cached_card_data(repo_id: str, sha: str) -> dict | None:
    from huggingface_hub import try_to_load_from_cache

    readme = try_to_load_from_cache(repo_id, "README.md", revision=sha)
    if not isinstance(readme, str):
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(readme).data.to_dict()


def fetch_config(ref: HubRef) -> Path:
    """Download `config.json` (or a PEFT adapter's `adapter_config.json`) at the pinned SHA; return the snapshot
    folder it lands in."""
    with hub_errors(f"{ref.repo_id}: config.json"):
        for name in ("config.json", "adapter_config.json"):
            try:
                return Path(hf_hub_download(ref.repo_id, name, revision=ref.sha)).parent
            except EntryNotFoundError:
                continue
        raise CandidateFormatError(
            "has neither config.json nor adapter_config.json; it is not a transformers model or PEFT adapter repo"
        )


def open_remote(ref: HubRef, api: HfApi):
    """A pinned repo's weights, read by HTTP Range requests (`ranged.HubTensorSource`): opening it fetches only
    the safetensors headers. Offline, the cached files."""
    if constants.HF_HUB_OFFLINE:
        return TensorSource(download(ref, WEIGHT_PATTERNS))
    with hub_errors(f"{ref.repo_id}: safetensors headers"):
        return HubTensorSource(ref.repo_id, ref.sha, api)


def download(ref: HubRef, patterns: list[str]) -> Path:
    """Fetch the files matching `patterns` at the pinned SHA (with the Hub's own progress bars)."""
    with hub_errors(f"Downloading {ref.repo_id}@{ref.sha[:12]}"):
        return Path(snapshot_download(ref.repo_id, revision=ref.sha, allow_patterns=patterns))


def derives_from(ref: HubRef, config: dict[str, Any], base_id: str) -> bool:
    """Whether the card's `base_model` or the config's `_name_or_path` names `base_id`."""
    declared = (ref.card_data or {}).get("base_model") or []
    declared = [declared] if isinstance(declared, str) else list(declared)
    return base_id in declared or config.get("_name_or_path") == base_id


def check_repo_id(repo_id: str) -> None:
    """Fail early on a malformed `--push-to`."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(f"--push-to {repo_id!r} is not a valid repo id ('org/name'): {error}") from error
    if "/" not in repo_id:
        raise HubError(f"--push-to {repo_id!r} needs a namespace: use 'org/name' or 'user/name'.")


def check_push_target(repo_id: str, overwrite: bool, api: HfApi) -> None:
    """Refuse to push into an existing repo that holds something other than a soup, unless `overwrite`."""
    check_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:
        raise HubError("--push-to needs the Hub, but HF_HUB_OFFLINE is set. Unset it, or drop --push-to.")
    with hub_errors(f"Checking {repo_id}"):
        try:
            files = api.list_repo_files(repo_id)
        except RepositoryNotFoundError:
            return
    existing = [f for f in files if f not in (".gitattributes",)]
    if existing and "soup.json" not in files and not overwrite:
        raise HubError(
            f"{repo_id} already holds other files ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}); "
            "pass --overwrite to replace them with the soup, or choose another --push-to."
        )


def validate_card(readme: Path) -> None:
    """Ask the Hub whether it accepts the card's metadata (`/api/validate-yaml`, as `ModelCard.push_to_hub` does),
    before anything is created or uploaded: the Hub rejects a commit whose README metadata it finds invalid."""
    if not readme.is_file():
        return
    card = ModelCard.load(readme)
    with hub_errors(f"Validating {readme.name}"):
        try:
            card.validate()
        except ValueError as error:
            try:
                errors = [e["message"] for e in json.loads(str(error))["errors"]]
            except (ValueError, KeyError, TypeError):
                errors = [str(error)]
            raise HubError(
                f"The Hub rejects the model card's metadata: {'; '.join(errors)}. Fix that field in "
                f"{readme}, then push again (`hf-soup push FOLDER --to REPO`); nothing was uploaded."
            ) from error


def commit_message(folder: Path) -> str:
    """The push's commit message, from the soup folder's `soup.json`.

    Raises:
        HubError: the folder has no `soup.json` (it was not written by `hf-soup cook --output`).
    """
    manifest = Path(folder) / "soup.json"
    if not manifest.is_file():
        raise HubError(f"{folder} has no soup.json; push folders written by `hf-soup cook --output`.")
    mixture = json.loads(manifest.read_text())["mixture"]
    return f"hf-soup: {mixture['recipe']} soup of {len(mixture['ingredients'])} ingredients"


def push(folder: Path, repo_id: str, private: bool, api: HfApi) -> dict[str, str]:
    """Create the repo if needed and upload the soup folder as **one** commit (stale files are deleted in it),
    with the message `hf-soup: <recipe> soup of <N> ingredients` from its `soup.json`.

    The commit is atomic on the Hub: if an upload fails, nothing is committed, and a repo created by this push is
    deleted again, so a failed push leaves no trace.

    Raises:
        HubError: the folder has no `soup.json`, its card's metadata would be rejected, or the upload failed.
    """
    message = commit_message(folder)
    validate_card(folder / "README.md")
    with hub_errors(f"Pushing to {repo_id}"):
        existed = api.repo_exists(repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True)
        try:
            info = api.upload_folder(
                folder_path=folder,
                repo_id=repo_id,
                commit_message=message,
                delete_patterns=["*", "**/*"],
            )
        except BaseException:
            if not existed:
                with contextlib.suppress(Exception):
                    api.delete_repo(repo_id)
            raise
    return {"repo_id": repo_id, "commit_url": info.commit_url, "commit_sha": info.oid}
