"""`hf_soup.sweep`: the documented import path of `hf_soup.training.sweep` (fine-tune a sweep of candidates)."""

from .training.sweep import *  # noqa: F403
from .training.sweep import __all__  # noqa: F401
