"""Short names for ingredients in tables and cards: unique within the soup, readable, never a machine's path.

`soup.json` keeps the full references (paths relative to the soup folder, Hub ids and revisions); what a reader
sees is the run folder's name (`lr1e-4-seed0-ep1`), with as many parent folders as it takes to tell two apart,
or the Hub id as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import PurePosixPath

from ..results import SoupSummary


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


def soup_names(summary: SoupSummary) -> Callable[[str], str]:
    """The short name of every reference a soup's table, card and plots show (the base, the candidates, the
    ingredients, the rows that are one candidate), unique among all of them; anything else as it is."""
    compatibility = summary.compatibility or {}
    bases = [summary.base, (summary.config or {}).get("base")]
    hub = set(compatibility.get("hub") or []) | (set(bases) if compatibility.get("base_on_hub") else set())
    entries = [summary.best_individual, summary.best_by_selection_metric, summary.oracle]
    references = [
        *bases,
        *(c.id for c in summary.candidates),
        *summary.mixture.ids(),
        *(e.id for e in entries if e is not None),
        *((summary.diagnostics or {}).get("ids") or []),
    ]
    names = short_names(
        [str(r) for r in references if r], {str(h) for h in hub}
    )  # a Trainer's base is a Path
    return lambda reference: names.get(str(reference), str(reference))
