"""Progress bars that respect `--quiet` and `HF_HUB_DISABLE_PROGRESS_BARS`, and the CLI's quiet console.

huggingface_hub's tqdm already honours the environment variable and `disable_progress_bars()`; hf-soup's bars are
its group `hf_soup`, so the console can keep them (and the Hub's download bars) while the libraries' own bars
("Loading weights", "Writing model shards", datasets' "Map") are off unless `--verbose`.
"""

from __future__ import annotations

import os
import sys

from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
from huggingface_hub.utils import tqdm as hub_tqdm

GROUP = "hf_soup"


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", quiet: bool = False, **kwargs):
    """A tqdm bar on stderr; disabled when `quiet` or when Hub progress bars are disabled."""
    return hub_tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=False, name=GROUP, **kwargs)


def library_bars_off() -> None:
    """Only hf-soup's bars and the Hub's transfers: transformers' and datasets' bars off, through their own
    switches (transformers reads huggingface_hub's global state when it is imported; datasets its variable).
    A user's `HF_HUB_DISABLE_PROGRESS_BARS` has the last word, as huggingface_hub intends."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    disable_progress_bars()
    enable_progress_bars(GROUP)
    enable_progress_bars("huggingface_hub")
