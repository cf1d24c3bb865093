"""`hf_soup.integrations`: the documented import path of `hf_soup.training.integrations` (`SoupCallback`)."""

from .training.integrations import *  # noqa: F403
from .training.integrations import __all__  # noqa: F401
