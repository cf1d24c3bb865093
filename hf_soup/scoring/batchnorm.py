"""Re-estimate BatchNorm running statistics after averaging (`--recalibrate-bn N`).

Averaged running means and variances describe none of the ingredients' activations exactly, and a soup's own
activations can drift from them. Recalibration resets each BatchNorm layer's statistics and re-estimates them as
the plain average over N batches of the selection split (momentum `None`), with every other layer in eval mode
and no gradients. It is deterministic: the same N batches, in the same order, every time.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError


def batchnorm_layers(model: torch.nn.Module) -> dict[str, torch.nn.modules.batchnorm._BatchNorm]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
    }


class BatchNormRecalibrator:
    """Called with the model after each mixture is loaded; re-estimates its BatchNorm statistics.

    Args:
        split (`EncodedSplit`): the selection split.
        collator: batches its features.
        batches (`int`): how many batches to run.
        batch_size (`int`): examples per batch.
    """

    def __init__(self, split, collator, batches: int, batch_size: int):
        if batches < 1:
            raise ConfigError(f"--recalibrate-bn must be at least 1 batch, got {batches}.")
        self.split, self.collator, self.batches, self.batch_size = split, collator, batches, batch_size

    def describe(self) -> str:
        return f"recalibrate-bn:{self.batches}x{self.batch_size}:{self.split.fingerprint}"

    def buffer_names(self, model: torch.nn.Module) -> list[str]:
        """The state-dict names this recalibration rewrites."""
        return [
            f"{name}.{buffer}"
            for name in batchnorm_layers(model)
            for buffer in ("running_mean", "running_var", "num_batches_tracked")
        ]

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> None:
        layers = batchnorm_layers(model)
        if not layers:
            raise ConfigError(
                "--recalibrate-bn: the model has no BatchNorm layer with running statistics; drop the flag."
            )
        saved = {name: (layer.momentum, layer.training) for name, layer in layers.items()}
        model.eval()
        for layer in layers.values():
            layer.reset_running_stats()
            layer.momentum = None  # a cumulative average over the batches, not an exponential one
            layer.train()
        device = next(model.parameters()).device
        order = self.split.order
        try:
            for start in range(0, min(len(order), self.batches * self.batch_size), self.batch_size):
                indices = order[start : start + self.batch_size].tolist()
                batch = self.collator([self.split.features[i] for i in indices])
                model(**{k: v.to(device) for k, v in batch.items() if k not in ("labels", "label")})
        finally:
            for name, layer in layers.items():
                layer.momentum, training = saved[name]
                layer.train(training)
            model.eval()
