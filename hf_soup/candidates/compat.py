"""Stage 2: decide which candidates can be souped together, from configs and safetensors headers only.

No tensor data is read to decide. The steps, one module each: find the candidates (`discovery.py`), screen them
against a reference (`screening.py`), line them up with the base (`base_alignment.py`), plan the vocabulary
(`vocab_plan.py`), and fetch the accepted Hub candidates (`discovery.fetch_accepted`). The result is a
`CompatibilityReport` (`report.py`) and the open weights of the base and of each accepted candidate.

A backbone soup (`soup="backbone"`) compares only the candidates' bodies (the tensors the base has, seen through
`BodyView`): their tasks, label sets and heads may differ, and the heads are left out.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoints.sources import SoupSources
from ..checkpoints.vocab import VocabMode
from .base_alignment import align_with_base, bodies_of, body_of
from .discovery import HubWeights, fetch_accepted, gather_candidates, given_order, resolve_base
from .report import CompatibilityReport, Rejection, SoupKind
from .screening import screen_candidates
from .vocab_plan import dtype_warnings, plan_vocabulary

logger = logging.getLogger(__name__)

__all__ = ["CompatibilityReport", "Rejection", "SoupKind", "body_of", "check_compatibility"]


def check_compatibility(
    base_dir: str | Path,
    patterns: list[str],
    *,
    allow_pickle: bool = False,
    label_order: list[str] | None = None,
    api=None,
    hub_weights: HubWeights = "download",
    trust_remote_code: bool = False,
    vocab: VocabMode = "base",
    soup: SoupKind = "full",
) -> tuple[CompatibilityReport, SoupSources]:
    """Resolve `patterns`, then check every candidate against a reference and against the base.

    Only configs and tensor headers are read. Then, by `hub_weights`, Hub candidates that pass and a Hub base are
    downloaded (`"download"`); or read by HTTP Range requests when a tensor is needed (`"stream"`: the base's
    tokenizer files are downloaded, no weights); or left as headers (`"headers"`: `hf-soup check`).

    Args:
        label_order (`list[str]`, *optional*): force this label order (used by `reproduce`).
        vocab (`str`, *optional*, defaults to `"base"`): the soup's vocabulary when candidates' embedding rows
            differ from the base's: the base's (`"base"`), or with every added token (`"union"`); see `vocab.py`.
        soup (`str`, *optional*, defaults to `"full"`): `"backbone"` compares and soups only the tensors the base
            has; the candidates' tasks, labels and heads may differ.

    Returns:
        `(report, sources)`: the report, and the open weights of the base and of each accepted candidate.
    """
    from huggingface_hub import HfApi

    api = api or HfApi()
    base, base_source = resolve_base(str(base_dir), allow_pickle, api, trust_remote_code, hub_weights)
    found, refused = gather_candidates(
        list(patterns), base, allow_pickle, api, trust_remote_code, base_source=base_source
    )
    backbone = soup == "backbone"  # then bodies are what is compared and souped
    found = [(c, body_of(base_source, s)) for c, s in found] if backbone else found
    report, screening = screen_candidates(found, refused, base, label_order, soup)
    report.given_order = given_order(list(patterns), [c.id for c, _ in found])
    readers = {c.id: screening.readers[c.id] for c in report.accepted}
    if hub_weights != "headers":
        fetch_accepted(report.accepted, readers, allow_pickle, trust_remote_code, hub_weights)
    readers = bodies_of(report, readers, base_source) if backbone else readers
    if report.accepted:
        align_with_base(report, base_source, readers[report.accepted[0].id], str(base_dir))
        report.alignment.vocab = plan_vocabulary(report, base_source, readers, screening.tokenizers, vocab)
        report.warnings.extend(dtype_warnings(readers))
    for message in report.warnings:
        logger.warning(message)
    return report, SoupSources(base.id, base_source, readers, report.alignment)
