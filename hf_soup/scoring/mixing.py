"""The learned soup's gradient machinery: mixing weights α (and a temperature β) learned by gradient descent
through the one live model of a `Workbench`, without holding the N models in memory.

- **Convex hull.** α = softmax(z) (one row per tensor with `granularity="layer"`), so every soup is a convex
  combination of the candidates; β = exp(b) > 0. Both start at the uniform soup and β = 1.
- **Memory.** Since ∂L/∂α_i = ⟨∂L/∂θ, θ_i⟩ (per tensor for per-layer α), one backward pass through the live model
  gives ∂L/∂θ, and each ingredient's tensor is then streamed from its memory-mapped file for the dot products,
  in a hook as soon as backward produces each parameter's gradient, which is then freed: peak memory is one
  model, its activations and a few tensors, whatever N is (`scripts/bench_learned_memory.py`).
- **Never worse than where it starts.** The soup is scored on the selection split before training and after
  every epoch, and the best of those is kept.
- Dropout is off (the model stays in eval mode), and batches follow a seeded permutation: runs are reproducible.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..evaluation.language_modeling import language_modeling_loss
from ..mixture import Ingredient, Mixture
from ..progress import progress_bar
from ..runtime import process_state


@dataclass
class LearnedState:
    """What learning produced: the final and the kept α, β, and the loss of every step."""

    ids: list[str]
    groups: list[str]  # one α row per group: ["*"] for per-model α, else tensor names
    final_alpha: np.ndarray
    kept_alpha: np.ndarray
    temperature: float
    kept_epoch: int
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "granularity": "model" if self.groups == ["*"] else "layer",
            "ids": self.ids,
            "kept_epoch": self.kept_epoch,
            "temperature": self.temperature,
            "alpha": {
                group: dict(zip(self.ids, row.tolist())) for group, row in zip(self.groups, self.kept_alpha)
            },
            "step_losses": self.losses,
        }


class MixingGradient:
    """∂L/∂α for the live model's last backward pass, one row per group, without materializing ∂L/∂θ at once.

    A post-accumulate-grad hook on each parameter takes ⟨∂L/∂θ_t, θ_i,t⟩ for every ingredient i as soon as the
    gradient of tensor t exists, reading θ_i,t from its file, then frees the gradient.
    """

    def __init__(self, workbench, ids: list[str], group_of: dict[str, int], num_groups: int):
        self.workbench, self.ids, self.group_of = workbench, ids, group_of
        self.value = torch.zeros(num_groups, len(ids), dtype=torch.float64)
        parameters = dict(workbench.model.named_parameters(remove_duplicate=False))
        names_of: dict[int, list[str]] = defaultdict(list)
        by_id: dict[int, torch.nn.Parameter] = {}
        for name in group_of:
            names_of[id(parameters[name])].append(name)
            by_id[id(parameters[name])] = parameters[name]
        for parameter in workbench.model.parameters():
            parameter.requires_grad_(id(parameter) in by_id)
        self.handles = [
            parameter.register_post_accumulate_grad_hook(self._hook(names_of[key]))
            for key, parameter in by_id.items()
        ]

    def _hook(self, names: list[str]):
        def consume(parameter: torch.nn.Parameter) -> None:
            gradient = parameter.grad.detach().reshape(-1).float()
            for name in names:
                row = self.group_of[name]
                for column, cid in enumerate(self.ids):
                    tensor = self.workbench.sources.read(cid, name)
                    tensor = tensor.to(gradient.device, torch.float32).reshape(-1)
                    self.value[row, column] += float(torch.dot(gradient, tensor))
            parameter.grad = None  # consumed: gradients never pile up

        return consume

    def reset(self) -> None:
        self.value.zero_()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class MixingTrainer:
    """Learns α and β for a set of candidates on the selection split, through the live model of a `Workbench`.

    Args:
        workbench (`Workbench`): the live model and the candidates' open weights.
        split (`EncodedSplit`): the selection split (the training data of α).
        collator: pads batches.
        spec (`TaskSpec`): the task: cross-entropy for classification, mean squared error for regression (where
            the temperature has no effect), mean token NLL for causal LMs.
        options (`LearnedOptions`): granularity, epochs, learning rate, batch size, seed (declared by the learned
            recipe, `recipes/learned.py`).
    """

    def __init__(self, workbench, split, collator, spec, options, quiet: bool = False):
        self.workbench, self.split, self.collator = workbench, split, collator
        self.spec, self.options, self.quiet = spec, options, quiet
        parameters = dict(workbench.model.named_parameters(remove_duplicate=False))
        self.learnable = [name for name in workbench.names if name in parameters]
        self.groups = ["*"] if options.granularity == "model" else list(self.learnable)

    def mixture(self, alpha: torch.Tensor, ids: list[str], revisions: dict | None) -> Mixture:
        """The mixture for weights `alpha` (groups × ingredients); per-layer rows go to `per_tensor_weights`."""
        alpha = alpha.detach().double()
        mean = alpha.mean(dim=0).tolist()  # what tensors outside the groups (float buffers) use
        base = Mixture.uniform("learned", ids, revisions)
        ingredients = tuple(Ingredient(i.id, w, i.revision) for i, w in zip(base.ingredients, mean))
        per_tensor = None
        if self.groups != ["*"]:
            per_tensor = {name: dict(zip(ids, row.tolist())) for name, row in zip(self.groups, alpha)}
        return Mixture("learned", ingredients, per_tensor_weights=per_tensor)

    def _batches(self, generator: torch.Generator):
        order = torch.randperm(len(self.split), generator=generator).numpy()
        for start in range(0, len(order), self.options.batch_size):
            yield order[start : start + self.options.batch_size]

    def _loss(self, logits: torch.Tensor, batch: dict, labels: np.ndarray, log_temperature: torch.Tensor):
        if self.spec.causal_lm:
            return language_modeling_loss(logits * log_temperature.exp(), batch)
        if self.spec.regression:
            return torch.nn.functional.mse_loss(logits[:, 0], torch.as_tensor(labels, device=logits.device))
        target = torch.as_tensor(labels, dtype=torch.long, device=logits.device)
        return torch.nn.functional.cross_entropy(logits * log_temperature.exp(), target)

    def _step(self, indices, logits_of_z, gradient: MixingGradient, ids: list[str], revisions) -> float:
        """One batch: load the soup of softmax(z), then backpropagate into z and the log-temperature."""
        z, log_temperature = logits_of_z
        device = process_state().device
        alpha = torch.softmax(z, dim=1)
        # No running sum: it would hold a second model-sized buffer for no gain here.
        self.workbench.load(self.mixture(alpha, ids, revisions))
        gradient.reset()
        batch = self.collator([self.split.features[i] for i in indices])
        with torch.enable_grad():
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = self.workbench.model(**batch).logits.float()
            loss = self._loss(logits, batch, self.split.labels[indices], log_temperature)
            loss.backward()  # fills gradient.value (∂L/∂α) and ∂L/∂b
            alpha.backward(gradient.value)  # chain rule through the softmax, into z
        return loss.item()

    def learn(self, ids: list[str], objective, revisions=None) -> tuple[Mixture, list[tuple], LearnedState]:
        """Learn α (and β); return the kept mixture, `(epoch, selection score, kept)` for the start (epoch 0)
        and every epoch, and the learned state."""
        options, model = self.options, self.workbench.model
        z = torch.zeros(len(self.groups), len(ids), dtype=torch.float64, requires_grad=True)
        log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.Adam([z, log_temperature], lr=options.lr)
        generator = torch.Generator().manual_seed(options.seed)
        group_of = {name: (0 if self.groups == ["*"] else index) for index, name in enumerate(self.learnable)}
        model.to(process_state().device).eval()  # before the hooks: moving a model replaces its parameters
        gradient = MixingGradient(self.workbench, ids, group_of, len(self.groups))

        kept = self.mixture(torch.softmax(z, dim=1), ids, revisions)
        kept_alpha, kept_epoch = torch.softmax(z, dim=1).detach().numpy(), 0
        best = objective(kept, None)
        epochs = [(0, best, True)]
        losses: list[float] = []
        steps = options.epochs * -(-len(self.split) // options.batch_size)
        try:
            with progress_bar(
                total=steps, desc="Learning soup weights", unit="step", quiet=self.quiet
            ) as bar:
                for epoch in range(1, options.epochs + 1):
                    for indices in self._batches(generator):
                        losses.append(self._step(indices, (z, log_temperature), gradient, ids, revisions))
                        optimizer.step()
                        optimizer.zero_grad()
                        bar.update(1)
                    trial = self.mixture(torch.softmax(z, dim=1), ids, revisions)
                    score = objective(trial, None)
                    accepted = score > best
                    if accepted:
                        kept, best, kept_epoch = trial, score, epoch
                        kept_alpha = torch.softmax(z, dim=1).detach().numpy()
                    epochs.append((epoch, score, accepted))
        finally:
            gradient.close()
            for parameter in model.parameters():
                parameter.requires_grad_(False)
                parameter.grad = None
        state = LearnedState(
            ids=ids,
            groups=self.groups,
            final_alpha=torch.softmax(z, dim=1).detach().numpy(),
            kept_alpha=kept_alpha,
            temperature=float(log_temperature.detach().exp()),
            kept_epoch=kept_epoch,
            losses=losses,
        )
        return kept, epochs, state
