"""hf-soup: model soups (Wortsman et al. 2022, arXiv 2203.05482) for Hugging Face checkpoints.

The names below are imported on first use (PEP 562), so `hf-soup` and `import hf_soup` do not pay for the whole
pipeline (evaluation, datasets, plotting) before a plain merge needs none of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

if TYPE_CHECKING:
    from .api import SoupResult, check, cook
    from .candidates.compat import CompatibilityReport
    from .config import SoupConfig
    from .errors import HfSoupError
    from .evaluation.data import carve_selection
    from .mixture import Ingredient, Mixture
    from .results import Entry, SoupManifest, SoupSummary

_LAZY = {
    "SoupResult": "api",
    "check": "api",
    "cook": "api",
    "CompatibilityReport": "candidates.compat",
    "SoupConfig": "config",
    "carve_selection": "evaluation.data",
    "HfSoupError": "errors",
    "Ingredient": "mixture",
    "Mixture": "mixture",
    "Entry": "results",
    "SoupManifest": "results",
    "SoupSummary": "results",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CompatibilityReport",
    "Entry",
    "HfSoupError",
    "Ingredient",
    "Mixture",
    "SoupConfig",
    "SoupManifest",
    "SoupResult",
    "SoupSummary",
    "__version__",
    "carve_selection",
    "check",
    "cook",
]
