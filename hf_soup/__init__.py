"""hf-soup: model soups (Wortsman et al. 2022, arXiv 2203.05482) for Hugging Face checkpoints."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import SoupResult, check, cook  # noqa: E402
from .compat import CompatibilityReport  # noqa: E402
from .config import SoupConfig  # noqa: E402
from .data import carve_selection  # noqa: E402
from .errors import HfSoupError  # noqa: E402
from .mixture import Ingredient, Mixture, Recipe  # noqa: E402

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
