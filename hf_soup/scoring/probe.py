"""A linear probe: the target task's head fitted on frozen features (backbone soups; the sweep's shared head).

The features are the input of the head's last linear layer (BERT's pooled output, ViT's CLS token, a ResNet's
pooled map). The probe is scikit-learn's `LogisticRegression` (L2, C = 1, lbfgs), the standard linear probe; its
coefficients become that layer's weight and bias, so the model with its probe is a plain transformers classifier.

For a backbone soup (`ProbeHead`), every scored mixture gets its own probe, fitted on the selection split's
features of its souped body; that probe is the head written with the soup. The selection split's scores are
**cross-fitted**, so that a mixture is not judged on the data its head was fitted to: two stratified halves
(seeded), each scored by a probe fitted on the other (scikit-learn's `cross_val_predict`). The features come from
one forward pass, and every logit follows from them, so a trial costs one pass over the selection split.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError, DatasetError
from ..evaluation.splits import EncodedSplit
from .scorer import predict


def head_layer(model: torch.nn.Module, num_labels: int) -> torch.nn.Linear:
    """The head's last linear layer: the last `nn.Linear` with one output per label."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no linear layer with {num_labels} outputs to fit a probe into."
        )
    return layers[-1]


def fit_probe(features: np.ndarray, labels: np.ndarray, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """`(weight (num_labels, d), bias (num_labels,))` of a logistic regression on `features`, as logits.

    Binary labels: scikit-learn fits one row z; the logits [−z/2, z/2] give the same probabilities.

    Raises:
        DatasetError: a label never occurs in `labels` (the probe could not learn it).
    """
    missing = sorted(set(range(num_labels)) - set(np.unique(labels).tolist()))
    if missing:
        raise DatasetError(
            f"The selection split has no example of label id(s) {missing}: the probe cannot learn them. Use a "
            "larger --selection-fraction, or a selection split with every label."
        )
    # Imported here: 1.3 s of imports that only backbone soups and sweeps need.
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(C=1.0, max_iter=2000).fit(np.asarray(features, dtype=np.float64), labels)
    if probe.coef_.shape[0] == 1:
        return _as_logits(probe.coef_[0]).T, _as_logits(probe.intercept_)[0]
    return probe.coef_, probe.intercept_


def _as_logits(scores: np.ndarray) -> np.ndarray:
    """Decision values as logits: a binary probe's single column z becomes [−z/2, z/2]."""
    return np.stack([-scores / 2, scores / 2], axis=1) if scores.ndim == 1 else scores


def cross_fitted_logits(
    features: np.ndarray, labels: np.ndarray, num_labels: int, seed: int = 0
) -> np.ndarray:
    """Out-of-fold logits of the probe: two stratified halves, each scored by a probe fitted on the other.

    Raises:
        DatasetError: a label has fewer than two examples, so it cannot be in both halves.
    """
    counts = np.bincount(labels, minlength=num_labels)
    if counts.min() < 2:
        raise DatasetError(
            f"The selection split has {counts.min()} example(s) of label id {int(counts.argmin())}: the probe's "
            "cross-fitted scores need two. Use a larger --selection-fraction."
        )
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(n_splits=2, shuffle=True, random_state=seed)
    scores = cross_val_predict(
        LogisticRegression(C=1.0, max_iter=2000),
        np.asarray(features, dtype=np.float64),
        labels,
        cv=folds,
        method="decision_function",
    )
    return _as_logits(scores).astype(np.float32)


def set_head(layer: torch.nn.Linear, weight: np.ndarray, bias: np.ndarray) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))


class HeadInputs:
    """`outputs(model, batch)` for `predict`: the input of `layer` (the features), captured by a forward hook."""

    def __init__(self, layer: torch.nn.Linear):
        self.layer = layer

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        captured = []
        handle = self.layer.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
        try:
            model(**batch)
        finally:
            handle.remove()
        return captured[0].float()


class ProbeHead:
    """The head of a backbone soup's live model, fitted anew for each mixture on the selection split.

    Args:
        model (`torch.nn.Module`): the live classifier (the target task's labels).
        split (`EncodedSplit`): the selection split (the probe's training data).
        collator: pads batches.
        batch_size (`int`): examples per forward pass.

    The features and the probe of each mixture are kept (by the mixture's content key), so a mixture scored
    again, or on the report splits, needs no new fit.
    """

    describe = "probe"

    def __init__(self, model: torch.nn.Module, split: EncodedSplit, collator, batch_size: int, quiet: bool):
        self.layer = head_layer(model, model.config.num_labels)
        self.split, self.collator, self.batch_size, self.quiet = split, collator, batch_size, quiet
        self.fitted: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # key -> weight, bias, logits
        self.current: str | None = None
        self.passes = 0

    def names(self, model: torch.nn.Module) -> list[str]:
        """The state-dict names of the probe's weight and bias."""
        owned = {id(p) for p in self.layer.parameters()}
        return [name for name, p in model.named_parameters() if id(p) in owned]

    def fit(self, key: str, model: torch.nn.Module) -> None:
        """Give the live model (holding mixture `key`'s body) that mixture's probe."""
        if key not in self.fitted:
            features = predict(
                model, self.split, self.collator, self.batch_size, self.quiet, HeadInputs(self.layer)
            )
            self.passes += 1
            labels, count = self.split.labels, self.layer.out_features
            weight, bias = fit_probe(features, labels, count)
            self.fitted[key] = (weight, bias, cross_fitted_logits(features, labels, count))
        if self.current != key:
            set_head(self.layer, *self.fitted[key][:2])
            self.current = key

    def selection_logits(self, key: str) -> np.ndarray:
        """The selection split's cross-fitted logits for mixture `key`: from its features, with no forward pass."""
        return self.fitted[key][2]


class CandidateHead:
    """The head of one candidate trained on the target task, kept for every mixture (`--head CANDIDATE`)."""

    def __init__(self, candidate_id: str):
        self.describe = f"head of {candidate_id}"
        self.passes = 0

    def fit(self, key: str, model: torch.nn.Module) -> None:
        """The live model was built from that candidate: its head is already there, and stays."""

    def selection_logits(self, key: str) -> None:
        return None
