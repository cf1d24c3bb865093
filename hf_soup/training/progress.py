"""The console of a sweep: one bar per variant with its running loss, then one line per variant.

Trainer's own console (its step bar and its raw `{'train_runtime': ...}` dicts) is for `--verbose`; by default a
sweep shows this instead.
"""

from __future__ import annotations

import logging
import time

from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from ..progress import progress_bar

logger = logging.getLogger(__name__)


class VariantProgress(TrainerCallback):
    """A bar named after the variant (`2/4 lr1e-4-seed0-ep1`) with its loss, and a summary line at the end:
    name, learning rate, epochs, seconds and mean training loss."""

    def __init__(self, label: str, learning_rate: float, epochs: float, quiet: bool = False):
        self.label, self.learning_rate, self.epochs, self.quiet = label, learning_rate, epochs, quiet
        self.bar, self.started, self.train_loss = None, 0.0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.bar = progress_bar(total=state.max_steps, desc=self.label, unit="step", quiet=self.quiet)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}")
        if "train_loss" in logs:
            self.train_loss = float(logs["train_loss"])

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()
        loss = f", training loss {self.train_loss:.4f}" if self.train_loss is not None else ""
        logger.info(
            "%s: learning rate %g, %g epoch(s), %.1f s%s",
            self.label,
            self.learning_rate,
            self.epochs,
            time.perf_counter() - self.started,
            loss,
        )


def use_variant_progress(trainer: Trainer, progress: VariantProgress) -> None:
    """Replace Trainer's console callbacks (its bar, or the printer of its dicts) with `progress`."""
    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(progress)
