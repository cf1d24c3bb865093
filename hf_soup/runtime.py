"""Where this process runs: alone, or as one of `accelerate launch`'s (or `torchrun`'s) processes."""

from __future__ import annotations

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


def process_state() -> PartialState:
    """This process's place in the run: one process, or one of `accelerate launch`'s (or `torchrun`'s) N.

    `ACCELERATE_USE_CPU=1` makes N CPU processes one gloo group; `PartialState()` alone would ignore it and leave
    each process on its own, so every hf-soup call site goes through here.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
