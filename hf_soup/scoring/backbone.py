"""Backbone soups (`--soup backbone`, the paper's cross-dataset soups, section 3.5): the target task's labels, the
live classifier built for them, and its head.

The candidates may come from different tasks; only their shared body is souped (`base_alignment.body_of`). The live model
is the candidates' architecture with the target task's labels: its head is a linear probe fitted for each scored
mixture (`probe.ProbeHead`), or the head of one candidate trained on the target task (`probe.CandidateHead`). The
written soup is that model: the souped body and the head, a plain transformers classifier.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import SoupConfig
from ..errors import ConfigError
from ..evaluation.data import SplitPlan, dataset_label_names
from ..evaluation.tasks import TaskSpec
from .probe import CandidateHead, ProbeHead


def backbone_target(config: SoupConfig, compatibility, spec: TaskSpec, plan: SplitPlan):
    """`(the candidate the live model is built from, the soup's label names)` of a backbone soup: the target
    dataset's labels (`--head probe`), or those of the candidate whose head is kept (`--head CANDIDATE`)."""
    if config.head == "probe":
        names = dataset_label_names(plan.selection, spec.label_column)
        if names is None:  # integer labels without names: one output per id that occurs
            values = [
                int(v) for data in (plan.selection, *plan.reports.values()) for v in data[spec.label_column]
            ]
            names = [str(i) for i in range(max(values) + 1)]
        return compatibility.accepted[0], names
    chosen = [
        c for c in compatibility.accepted if c.id == config.head or _same_folder(c.local_dir, config.head)
    ]
    if not chosen:
        accepted = ", ".join(c.id for c in compatibility.accepted)
        raise ConfigError(
            f"--head {config.head!r} is not one of the accepted candidates ({accepted}); name the candidate "
            "trained on the target task, or use --head probe."
        )
    candidate = chosen[0]
    return candidate, candidate.label_names or [f"LABEL_{i}" for i in range(candidate.num_labels)]


def _same_folder(folder, other: str) -> bool:
    return Path(other).exists() and Path(folder).resolve() == Path(other).resolve()


def probe_model(model_class, reference, labels: list[str], dtype: torch.dtype):
    """The reference candidate's architecture with one output per target label (the probe's layer)."""
    from transformers import AutoConfig

    settings = {k: v for k, v in reference.config.items() if k not in ("id2label", "label2id", "num_labels")}
    settings = AutoConfig.for_model(
        **settings, id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}
    )
    return model_class.from_config(settings, dtype=dtype)


def backbone_head(config: SoupConfig, model, sources, selection, collator, quiet: bool):
    """A backbone soup's head (`probe.py`), after checking that it is all the live model needs beyond the body;
    `None` for other soups."""
    if config.soup != "backbone":
        return None
    head = (
        ProbeHead(model, selection, collator, config.batch_size, quiet)
        if config.head == "probe"
        else CandidateHead(config.head)
    )
    needed = [n for n in model.state_dict() if n not in set(sources.reference.keys())]
    if config.head == "probe" and (extra := sorted(set(needed) - set(head.names(model)))):
        raise ConfigError(
            f"--head probe fits the head's last linear layer, but {type(model).__name__}'s head also has "
            f"{', '.join(extra[:3])}, which the base lacks; keep a candidate's whole head with --head CANDIDATE."
        )
    return head


def head_tensors(scorer) -> dict[str, torch.Tensor]:
    """The soup's head as loaded in the live model (a backbone soup's tensors beyond the body)."""
    body = set(scorer.workbench.sources.reference.keys())
    state = scorer.workbench.model.state_dict()
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items() if name not in body}
