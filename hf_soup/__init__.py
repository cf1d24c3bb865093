"""hf-soup: model soups (Wortsman et al. 2022, arXiv 2203.05482) for Hugging Face checkpoints."""

from __future__ import annotations

from .api import SoupResult, check, cook
from .compat import CompatibilityReport
from .config import SoupConfig
from .data import carve_selection
from .errors import HfSoupError
from .mixture import Ingredient, Mixture
from .results import Entry, SoupManifest, SoupSummary
from .version import __version__

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
