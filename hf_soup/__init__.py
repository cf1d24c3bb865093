"""hf-soup: model soups (Wortsman et al. 2022, arXiv 2203.05482) for Hugging Face checkpoints."""

from __future__ import annotations

__version__ = "0.3.0"

from .api import SoupResult, check, cook
from .compat import CompatibilityReport
from .config import SoupConfig
from .data import carve_selection
from .errors import HfSoupError
from .mixture import Ingredient, Mixture, Recipe

__all__ = [
    "CompatibilityReport",
    "HfSoupError",
    "Ingredient",
    "Mixture",
    "Recipe",
    "SoupConfig",
    "SoupResult",
    "__version__",
    "carve_selection",
    "check",
    "cook",
]
