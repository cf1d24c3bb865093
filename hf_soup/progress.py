"""Progress bars that respect `--quiet` and `HF_HUB_DISABLE_PROGRESS_BARS`.

huggingface_hub's tqdm already honours the environment variable and `disable_progress_bars()`; this only adds
the per-call `quiet` switch.
"""

from __future__ import annotations

from huggingface_hub.utils import tqdm as hub_tqdm


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", quiet: bool = False, **kwargs):
    """A tqdm bar on stderr; disabled when `quiet` or when Hub progress bars are disabled."""
    return hub_tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=False, **kwargs)
