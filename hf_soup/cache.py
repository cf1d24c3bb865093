"""On-disk caches: scores by content hash, and weight fingerprints by file identity.

Every write goes to a temporary file in the same folder and is then renamed over the target, so concurrent runs
sharing a cache never see a half-written entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import constants

from .version import __version__


def default_cache_dir() -> Path:
    """`$HF_SOUP_CACHE`, else `$HF_HOME/hf_soup`."""
    return Path(os.environ.get("HF_SOUP_CACHE") or Path(constants.HF_HOME) / "hf_soup")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class JsonCache:
    """A folder of JSON entries keyed by strings, with hit and miss counters.

    Args:
        folder (`Path`): where entries live; created on first write.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            value = json.loads(self._path(key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: dict[str, Any]) -> None:
        atomic_write_text(self._path(key), json.dumps(value, sort_keys=True))


@functools.cache
def code_fingerprint(package: Path = Path(__file__).parent) -> str:
    """sha256 of hf-soup's own source files (their paths and bytes), with the version.

    Scores depend on more than the version says: scoring, metrics, tokenisation and splits changed in several
    commits of one release. Any change to the code makes new cache keys, so an older checkout's scores are never
    served to a newer one (at the price of rescoring once after each change).
    """
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(*parts: Any) -> str:
    """A stable key from JSON-serialisable parts and the code's fingerprint (new code never reads old scores)."""
    return json.dumps([code_fingerprint(), *parts], sort_keys=True, default=str)
