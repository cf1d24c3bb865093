"""Short names for ingredients in tables and cards: unique within the soup, readable, never a machine's path.

`soup.json` keeps the full references (paths relative to the soup folder, Hub ids and revisions); what a reader
sees is the run folder's name (`lr1e-4-seed0-ep1`), with as many parent folders as it takes to tell two apart,
or the Hub id as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePosixPath


def _folders(reference: str) -> list[str]:
    """A local path's folder names, innermost last, without `.`/`..` and the root."""
    parts = PurePosixPath(reference.replace("\\", "/")).parts
    return [p for p in parts if p not in (".", "..", "/")] or [reference]


def short_names(references: Iterable[str], hub: Iterable[str] = ()) -> dict[str, str]:
    """`{reference: short name}`: Hub ids as they are; a local path by its last folder, or its last two, three ...
    folders where the last one alone would name two ingredients alike."""
    references, hub = list(dict.fromkeys(references)), set(hub)
    folders = {r: _folders(r) for r in references if r not in hub}
    names = {r: r for r in references if r in hub}
    depth = 1
    while folders:
        candidates = {r: "/".join(parts[-depth:]) for r, parts in folders.items()}
        taken = list(names.values()) + list(candidates.values())
        for reference, name in candidates.items():
            if taken.count(name) == 1 or depth >= len(folders[reference]):
                names[reference] = name
        folders = {r: parts for r, parts in folders.items() if r not in names}
        depth += 1
    return names
