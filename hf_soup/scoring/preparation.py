"""Stage 3: what scoring needs: the task, the data encoded for the models, a live model and the `Scorer`.

Text and images differ only here: a tokenizer and padded, length-sorted batches, or an image processor and
stacked pixel values. Everything downstream (recipes, summaries, outputs) sees one `Scorer`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    default_data_collator,
)

from ..candidates.discovery import load_candidate
from ..config import SoupConfig
from ..errors import ConfigError, DatasetError
from ..evaluation.data import LabelBalance, SplitPlan, fit_metrics_to_labels, plan_splits
from ..evaluation.images import encode_image_split
from ..evaluation.language_modeling import encode_document_split, pad_documents
from ..evaluation.preprocessors import load_image_processor
from ..evaluation.tasks import TaskSpec, task_spec
from ..evaluation.text import encode_text_split
from ..merge.materialize import Workbench
from .backbone import backbone_head, backbone_target, probe_model
from .batchnorm import BatchNormRecalibrator
from .scorer import Scorer, model_outputs, predict, score_logits
from .trainer import TrainerScorer

logger = logging.getLogger(__name__)


def task_spec_of(config: SoupConfig) -> TaskSpec:
    return task_spec(
        config.task,
        config.dataset,
        text_column=config.text_column,
        text_pair_column=config.text_pair_column,
        label_column=config.label_column,
        regression=config.regression,
        image_column=config.image_column,
    )


def prepare_trainer_scorer(trainer, report_dataset, checked, cache):
    """A `TrainerScorer` over the trainer's eval dataset (selection) and `report_dataset` (or the same split).

    `checked` is the check stage's result (`stages.Checked`): the compatible candidates and their sources.
    """
    compatibility = checked.compatibility
    if trainer.eval_dataset is None:
        raise ConfigError(
            "cook(trainer=...) scores on trainer.eval_dataset, which is None: give the Trainer one."
        )
    datasets = {"selection": trainer.eval_dataset}
    notes = []
    if report_dataset is not None:
        datasets["report"] = report_dataset
    else:
        datasets["eval_dataset"] = trainer.eval_dataset
        notes.append(
            "SELECTION AND REPORT USE THE SAME SPLIT (trainer.eval_dataset): reported scores are optimistic, "
            "because the soup was chosen on them. Pass report_dataset= for numbers you can claim."
        )
    for note in notes:
        logger.warning(note)
    if trainer.model is None:  # e.g. after `hyperparameter_search`, which leaves no model behind
        model = scoring_model(AutoModelForSequenceClassification, compatibility.accepted[0], False)
        trainer.model = trainer.model_wrapped = model
    trainer.model.to(torch.float32)
    if compatibility.label_names:  # the soup's head rows follow this order; the live model's config says so
        trainer.model.config.id2label = dict(enumerate(compatibility.label_names))
        trainer.model.config.label2id = {name: i for i, name in enumerate(compatibility.label_names)}
    workbench = Workbench(trainer.model, checked.sources)
    scorer = TrainerScorer(trainer, workbench, datasets, checked.fingerprints, cache)
    plan = SplitPlan(trainer.eval_dataset, {}, "trainer.eval_dataset", report_dataset is None, notes)
    return scorer, plan


def scoring_model(model_class, reference, trust_remote_code: bool, dtype: torch.dtype = torch.float32):
    """A model of the candidates' architecture in the soup's dtype (so a soup is scored as it is written), whose
    weights the Workbench then sets per mixture.

    A LoRA reference is built from its merged config: loading the adapter folder would inject the adapter.
    """
    if reference.kind == "lora":
        from transformers import AutoConfig

        settings = AutoConfig.for_model(**reference.config)
        return model_class.from_config(settings, dtype=dtype)
    return model_class.from_pretrained(reference.local_dir, dtype=dtype, trust_remote_code=trust_remote_code)


def encoder(spec: TaskSpec, preprocessor, labels: list[str] | None, num_labels: int, config, quiet: bool):
    """`(encode(name, data) -> EncodedSplit, collator, model class)` for the task's inputs."""
    if spec.causal_lm:

        def encode(name, data):
            return encode_document_split(name, data, spec, preprocessor, config.max_length)

        return encode, pad_documents, AutoModelForCausalLM
    if spec.is_image:

        def encode(name, data):
            return encode_image_split(
                name, data, spec, preprocessor, model_labels=labels, num_labels=num_labels, quiet=quiet
            )

        return encode, default_data_collator, AutoModelForImageClassification

    def encode(name, data):
        return encode_text_split(
            name,
            data,
            spec,
            preprocessor,
            model_labels=labels,
            num_labels=num_labels,
            max_length=config.max_length,
        )

    return encode, DataCollatorWithPadding(preprocessor), AutoModelForSequenceClassification


def prepare_scorer(config: SoupConfig, spec: TaskSpec, checked, preprocessor, quiet: bool):
    """hf-soup's own `Scorer`: the task's splits encoded once, and a live model in the soup's dtype."""
    compatibility = checked.compatibility
    reference = compatibility.accepted[0]
    if preprocessor is None:
        raise ConfigError(
            f"Neither the base {config.base} nor {reference.id} has tokenizer files; "
            "save the tokenizer next to the base model (`tokenizer.save_pretrained(base_dir)`)."
        )
    plan = _plan(config, spec)
    for note in plan.notes:
        logger.warning(note)
    if config.soup == "backbone":  # the target task's labels; the head comes from --head
        reference, compatibility.label_names = backbone_target(config, compatibility, spec, plan)
    num_labels = len(compatibility.label_names) if config.soup == "backbone" else reference.num_labels
    _check_outputs(spec, num_labels)
    spec = spec.with_top5(num_labels)
    encode, collator, model_class = encoder(
        spec, preprocessor, compatibility.label_names, num_labels, config, quiet
    )
    splits = {"selection": encode("selection", plan.selection)}
    for name, data in plan.reports.items():
        splits[name] = encode(name, data)
    plan.warnings += _blank_text_warnings(spec, splits, config.strict)
    plan.notes += _truncation_notes(spec, splits, config.max_length)
    labels = compatibility.label_names
    balance = _fit_metrics(
        config, spec, splits, len(labels) if labels else compatibility.accepted[0].num_labels, labels
    )
    if balance.warning:
        logger.warning(balance.warning)
        plan.warnings.append(balance.warning)
    spec = balance.spec
    model = _live_model(config, model_class, reference, compatibility, checked.dtype)
    recalibrate = None
    if config.recalibrate_bn:
        recalibrate = BatchNormRecalibrator(
            splits["selection"], collator, config.recalibrate_bn, config.batch_size
        )
    scorer = Scorer(
        Workbench(model, checked.sources, after_load=recalibrate),
        spec,
        splits,
        checked.fingerprints,
        collator,
        cache=None if config.no_cache else checked.cache,
        batch_size=config.batch_size,
        quiet=quiet,
        selection_metric=config.selection_metric,
        early_rejection=not config.no_early_rejection,
        variant=recalibrate.describe() if recalibrate else "",
        head=backbone_head(config, model, checked.sources, splits["selection"], collator, quiet),
    )
    return scorer, plan


def _live_model(config: SoupConfig, model_class, reference, compatibility, dtype: torch.dtype):
    """The model mixtures are loaded into: the reference's, or a backbone soup's classifier for the target labels;
    with the soup's vocabulary rows, not the reference's (`vocab.py`)."""
    if config.soup == "backbone" and config.head == "probe":
        model = probe_model(model_class, reference, compatibility.label_names, dtype)
    else:
        model = scoring_model(model_class, reference, config.trust_remote_code, dtype)
    if compatibility.alignment.vocab is not None:
        model.resize_token_embeddings(compatibility.alignment.vocab.rows, mean_resizing=False)
    return model


def _check_outputs(spec: TaskSpec, num_labels: int) -> None:
    if spec.causal_lm:  # scored by their language-modeling head, whatever `num_labels` the config carries
        return
    if spec.regression != (num_labels == 1):
        kind = "regression" if spec.regression else "classification"
        fix = "regression needs num_labels=1 models" if spec.regression else "pass --regression for them"
        raise ConfigError(f"The candidates have {num_labels} output(s) but the task is {kind}: {fix}.")


def _blank_text_warnings(spec: TaskSpec, splits: dict, strict: bool) -> list[str]:
    """Examples with a missing or blank text are scored as empty strings, and said so (fatal with --strict)."""
    warnings = []
    for split in splits.values():
        if split.empty_inputs and spec.causal_lm:
            message = (
                f"The {split.name} split has {split.empty_inputs} document(s) of fewer than two tokens in "
                f"{spec.text_column!r}; they predict nothing and are left out."
            )
        elif split.empty_inputs:
            message = (
                f"The {split.name} split has {split.empty_inputs} example(s) with a missing or blank text in "
                f"{spec.text_column!r}{' or ' + repr(spec.text_pair_column) if spec.text_pair_column else ''}; "
                "they are scored as empty strings."
            )
        else:
            continue
        if strict:
            raise DatasetError(f"--strict: {message} Fill or drop them, or drop --strict.")
        logger.warning(message)
        warnings.append(message)
    return warnings


def _truncation_notes(spec: TaskSpec, splits: dict, max_length: int) -> list[str]:
    """Causal LMs: how many documents were truncated to `--max-length` (they are never packed)."""
    if not spec.causal_lm:
        return []
    counts = ", ".join(
        f"{split.truncated} of {len(split)} {split.name} documents" for split in splits.values()
    )
    note = (
        f"Documents are truncated to --max-length {max_length} tokens, not packed: {counts} were cut. Scores are "
        "the mean NLL of each document's first tokens."
    )
    logger.info(note)
    return [note]


def _plan(config: SoupConfig, spec: TaskSpec) -> SplitPlan:
    """The selection and report splits of `config`'s data."""
    return plan_splits(
        spec,
        selection_split=config.selection_split,
        report_split=config.report_split,
        selection_fraction=config.selection_fraction,
        seed=config.seed,
        max_eval_examples=config.max_eval_examples,
    )


def _fit_metrics(
    config: SoupConfig, spec: TaskSpec, splits: dict, num_labels: int, label_names: list[str] | None
) -> LabelBalance:
    """The task's metrics fitted to the selection split's labels (F1 of the positive label, macro-F1, extras),
    as `cook` and `evaluate` both report them; each split learns which label id is positive."""
    requested = (
        *config.extra_metrics,
        *(m for m in [config.selection_metric] if m == "matthews_correlation"),
    )
    selection = splits.get("selection")  # None: a task whose metrics do not depend on the labels
    balance = fit_metrics_to_labels(
        spec,
        selection.labels if selection else None,
        num_labels,
        label_names,
        config.positive_label,
        requested,
    )
    for split in splits.values():
        split.pos_label = balance.pos_label if balance.spec.positive_label is not None else split.pos_label
    return balance


def evaluate_model(model_dir: str, config: SoupConfig, quiet: bool = False) -> dict[str, dict]:
    """Score one model folder on the report split(s) of a task, as `hf-soup evaluate` does.

    Args:
        model_dir (`str`): a folder written by `save_pretrained`, with tokenizer (or image processor) files.
        config (`SoupConfig`): the task or dataset (and its columns), the splits and the evaluation options, with
            the same defaults as a soup run (`base` and `candidates` are not read).
    """
    candidate = load_candidate(model_dir)
    spec = task_spec_of(config).with_top5(candidate.num_labels)
    plan = _plan(config, spec)
    preprocessor = _own_preprocessor(model_dir, spec)
    encode, collator, model_class = encoder(
        spec, preprocessor, candidate.label_names, candidate.num_labels, config, quiet
    )
    splits = {name: encode(name, data) for name, data in plan.reports.items()}
    # The same metrics as `cook` reports for this data (F1 of the rarer label, macro-F1, ...), decided from the
    # selection split's labels (encoded only for the custom classification tasks that need them).
    if spec.name == "custom" and not spec.regression:
        splits["selection"] = encode("selection", plan.selection)
    spec = _fit_metrics(config, spec, splits, candidate.num_labels, candidate.label_names).spec
    splits.pop("selection", None)
    model = model_class.from_pretrained(model_dir, dtype="auto")  # its own dtype, as it was scored when made
    scores = {}
    for name, split in splits.items():
        logits = predict(model, split, collator, config.batch_size, quiet, model_outputs(spec, split))
        result = score_logits(logits, split, spec)
        scores[name] = {"metrics": result.metrics, "loss": result.loss, "n": result.n}
    return scores


def _own_preprocessor(model_dir: str, spec: TaskSpec):
    """The folder's own image processor or tokenizer."""
    if spec.is_image:
        return load_image_processor([Path(model_dir)])[0]
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(
            f"{model_dir} has no usable tokenizer files ({error}); save the tokenizer with the model."
        ) from error
