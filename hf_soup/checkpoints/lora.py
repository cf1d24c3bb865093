"""PEFT LoRA candidates: checked from `adapter_config.json`, scored and souped as their merged models.

A LoRA candidate is presented to the rest of hf-soup as the full model it merges into, tensor by tensor
(`LoraSource`): an adapted weight is `W + scale · B @ A` (scale = alpha / r, or / sqrt(r) with rslora, per module as peft's
`rank_pattern` and `alpha_pattern` say),
`modules_to_save` tensors (the task head) are the adapter's own, everything else is the base's. So a soup of LoRAs
with weights w_i (summing to 1) is exactly `W + Σ_i w_i · scale_i · B_i A_i`: the product of each pair is averaged,
never A and B separately (that would give (Σ B)(Σ A), which is wrong). LoRA and full candidates can be mixed:
the LoRAs count as their merged models.

Writing a soup of LoRAs as one adapter (`--output-kind lora`) is `adapter.py`'s job.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CandidateFormatError

if TYPE_CHECKING:
    from peft import LoraConfig
from .sources import HEAD_PARTS
from .weights import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    TensorSource,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# adapter_config.json settings whose update is not `scale · B @ A` on a plain weight, refused with the reason.
_UNSUPPORTED = {
    "use_dora": "it uses DoRA, whose magnitude vector rescales the merged weight: the update is not scale·B·A",
    "lora_bias": "it trains LoRA biases (lora_bias), which hf-soup does not soup",
    "fan_in_fan_out": "it sets fan_in_fan_out (Conv1D layers), which hf-soup does not soup",
    "target_parameters": "it targets nn.Parameters (target_parameters), which hf-soup does not soup",
    "layer_replication": "it uses layer_replication, which changes the model's layers",
    "trainable_token_indices": "it trains token embeddings (trainable_token_indices), which hf-soup does not soup",
}
_MERGE_HINT = (
    " Merge it into a full model first (`model.merge_and_unload().save_pretrained(dir)`) and soup that."
)


def is_adapter_folder(folder: Path) -> bool:
    """A folder with `adapter_config.json` and no full model weights (a `config.json` beside it may hold labels)."""
    folder = Path(folder)
    full = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    return (folder / ADAPTER_CONFIG).is_file() and not any((folder / name).is_file() for name in full)


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CandidateFormatError(f"{path} is not valid JSON ({error}); fix or re-download it.") from error


def check_adapter(adapter: dict[str, Any], base_id: str, base_dir: Path) -> None:
    """Refuse, with the reason, an adapter hf-soup cannot soup exactly or one made for another base.

    Needs only `adapter_config.json`: nothing is downloaded or opened before this passes.
    """
    if adapter.get("peft_type") != "LORA":
        raise CandidateFormatError(
            f"it is a {adapter.get('peft_type')} adapter; only LoRA adapters are souped"
        )
    for key, reason in _UNSUPPORTED.items():
        if adapter.get(key):
            raise CandidateFormatError(reason + "." + _MERGE_HINT)
    declared = adapter.get("base_model_name_or_path")
    if not same_base(declared, base_id, base_dir):
        raise CandidateFormatError(
            f"it is a LoRA of {declared!r}, not of --base {base_id}; soup adapters of one base only (if it is "
            "the same model under another name, pass that name as --base or fix base_model_name_or_path)"
        )


def same_base(declared: str | None, base_id: str, base_dir: Path) -> bool:
    """Whether an adapter's `base_model_name_or_path` names the `--base` model (a Hub id, or the same folder)."""
    if not declared:
        return False
    if declared == base_id.partition("@")[0]:
        return True
    try:
        declared_path = Path(declared).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    return declared_path in (Path(base_dir).resolve(), Path(base_id).expanduser().resolve())


@dataclass
class LoraModule:
    """One adapted weight: the adapter's A and B tensor names and the update's scale."""

    weight: str  # the merged model's tensor, e.g. `bert.encoder.layer.0.attention.self.query.weight`
    lora_a: str
    lora_b: str
    rank: int
    scale: float


@dataclass
class LoraLayout:
    """What a LoRA adapter changes, in the merged model's tensor names."""

    modules: dict[str, LoraModule] = field(default_factory=dict)  # by merged weight name
    saved: dict[str, str] = field(default_factory=dict)  # merged tensor name -> adapter tensor name


def lora_config(adapter: dict[str, Any]) -> LoraConfig:
    """peft's `LoraConfig` of an `adapter_config.json` (keys this peft does not know are left out, as
    `LoraConfig.from_pretrained` does). peft is imported here, when a LoRA is met: it loads transformers."""
    from peft import LoraConfig

    known = {item.name for item in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{key: value for key, value in adapter.items() if key in known})


def module_scale(config: LoraConfig, module: str, rank: int) -> float:
    """The update scale of `module` as peft computes it: its alpha (`alpha_pattern`, else `lora_alpha`) over its
    rank (`rank_pattern`, else `r`), or over sqrt(rank) with rslora.

    Raises:
        CandidateFormatError: the stored A tensor's rank is not the rank the config gives this module.
    """
    from peft.utils.other import get_pattern_key

    declared = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    if rank != declared:
        raise CandidateFormatError(
            f"its LoRA on {module} has rank {rank}, but adapter_config.json gives it rank {declared}; re-save it"
        )
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank


def read_layout(adapter: dict[str, Any], headers) -> LoraLayout:
    """Map an adapter's tensors (from their headers) onto the merged model's tensor names, each with the scale
    peft's merge uses (per-module `rank_pattern` and `alpha_pattern` honoured)."""
    layout = LoraLayout()
    config = lora_config(adapter)
    for key in headers.keys():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_embedding_" in name or ".lora_magnitude_vector" in name:
            raise CandidateFormatError(
                f"it has {key}: LoRA on embeddings or DoRA magnitudes are not souped." + _MERGE_HINT
            )
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            b_key = key.replace(".lora_A.weight", ".lora_B.weight")
            shape = headers.shape(key)
            if len(shape) != 2 or b_key not in headers:
                raise CandidateFormatError(
                    f"its LoRA on {module} is not a plain linear one (A has shape {list(shape)})."
                    + _MERGE_HINT
                )
            rank = shape[0]
            scale = module_scale(config, module, rank)
            layout.modules[f"{module}.weight"] = LoraModule(f"{module}.weight", key, b_key, rank, scale)
        elif ".lora_B." not in name:
            layout.saved[name] = key  # modules_to_save: a full tensor, e.g. the classification head
    if not layout.modules and not layout.saved:
        raise CandidateFormatError("its adapter has no LoRA tensors")
    return layout


class LoraSource:
    """The merged model of one LoRA adapter, read tensor by tensor like a `TensorSource`.

    Args:
        folder (`Path`): the adapter folder.
        config (`dict`): its `adapter_config.json`.
        adapter (`TensorSource`): the adapter's weights.
        layout (`LoraLayout`): what the adapter changes.
        base (`TensorSource`): the base model's weights.
        merged (`tuple`): `(names, shapes, dtypes)` of the merged tensors; `names` maps every merged tensor name
            to the base's name for it (`None`: saved by the adapter only).
    """

    def __init__(self, folder, config, adapter, layout: LoraLayout, base, merged: tuple):
        self.folder, self.config, self.adapter, self.layout, self.base = (
            Path(folder),
            config,
            adapter,
            layout,
            base,
        )
        self._names, self._shapes, self._dtypes = merged
        # The adapter's own files; the base is fingerprinted once on its own, and its fingerprint is appended to
        # every LoRA candidate's.
        self.files = [self.folder / ADAPTER_CONFIG, *adapter.files]

    @property
    def stored(self):
        """The tensors held in `files` (checked for NaN/Inf): the adapter's, not the merged ones."""
        return self.adapter

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def delta(self, name: str) -> torch.Tensor | None:
        """`scale · B @ A` of the adapted weight `name`, in float32; `None` if it is not adapted."""
        module = self.layout.modules.get(name)
        if module is None:
            return None
        a = self.adapter.get(module.lora_a).float()
        b = self.adapter.get(module.lora_b).float()
        return (b * module.scale) @ a

    def get(self, name: str) -> torch.Tensor:
        if name in self.layout.saved:
            return self.adapter.get(self.layout.saved[name])
        tensor = self.base.get(self._names[name])
        delta = self.delta(name)
        if delta is None:
            return tensor
        # Kept in float32 until the soup is formed: rounding each W + s·BA to a bf16 base's dtype first would lose
        # most of a small update before averaging.
        return tensor.float() + delta

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[start:stop]


def merged_config(
    adapter_folder: Path, adapter: dict[str, Any], base_config: dict[str, Any], layout: LoraLayout, headers
) -> dict[str, Any]:
    """The merged model's `config.json`: the base's, with the task head's class and labels (a causal LM's: the
    base's, with its causal-LM class).

    Labels come from a `config.json` saved beside the adapter (`model.config.save_pretrained(dir)`), else from a
    base that is already a classifier, else they are generic (`LABEL_k`, trusted to follow the dataset's order),
    as many as the saved head has rows.
    """
    from transformers.models.auto import modeling_auto

    config = {k: v for k, v in base_config.items() if k not in ("id2label", "label2id", "_name_or_path")}
    model_type = config.get("model_type")
    architecture = next(iter(base_config.get("architectures") or []), "")
    base_is_classifier = architecture.endswith(("ForSequenceClassification", "ForImageClassification"))
    if adapter.get("task_type") == "CAUSAL_LM" or architecture.endswith("ForCausalLM"):
        # A language model: no head of its own to save, no labels.
        if not architecture.endswith("ForCausalLM"):
            if model_type not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
                raise CandidateFormatError(f"its base ({model_type}) has no causal-LM class in transformers")
            architecture = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        return {**config, "architectures": [architecture]}
    if not base_is_classifier:
        if adapter.get("task_type") == "SEQ_CLS":
            mapping = modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
        else:
            mapping = modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
        if model_type not in mapping:
            raise CandidateFormatError(
                f"its base ({model_type}) is not a classifier and the adapter's task_type is "
                f"{adapter.get('task_type')}; hf-soup soups causal LMs (CAUSAL_LM), sequence (SEQ_CLS) and image "
                "classifiers"
            )
        architecture = mapping[model_type]
    config["architectures"] = [architecture]
    beside = Path(adapter_folder) / "config.json"
    labels = json.loads(beside.read_text()).get("id2label") if beside.is_file() else None
    if labels is None and base_is_classifier:
        labels = base_config.get("id2label")
    if labels is None:
        head = [n for n in layout.saved if HEAD_PARTS & set(n.split(".")[:-1]) and n.endswith(".weight")]
        rows = {headers.shape(layout.saved[n])[0] for n in head}
        count = rows.pop() if len(rows) == 1 else int(base_config.get("num_labels", 2))
        labels = {str(i): f"LABEL_{i}" for i in range(count)}
    config["id2label"] = {str(k): v for k, v in labels.items()}
    config["label2id"] = {v: int(k) for k, v in labels.items()}
    config.pop("num_labels", None)
    return config


def merged_tensors(config: dict[str, Any], base, layout: LoraLayout, headers):
    """Names, shapes and dtypes of the merged model (from the model class on the meta device), mapped to the base.

    Raises:
        CandidateFormatError: a parameter of the merged model is neither in the base nor saved by the adapter
            (the task head without `modules_to_save`), or an adapted module is not in the base.
    """
    import transformers

    model_class = getattr(transformers, config["architectures"][0], None)
    if model_class is None:
        raise CandidateFormatError(f"transformers has no class {config['architectures'][0]}")
    settings = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = model_class(settings)
    prefix = getattr(model_class, "base_model_prefix", "")
    parameters = {name for name, _ in model.named_parameters()}
    names, shapes, dtypes = {}, {}, {}
    for name in model.state_dict():
        base_name = name if name in base else name.removeprefix(f"{prefix}.")
        if name in layout.saved:
            names[name], shapes[name] = None, tuple(headers.shape(layout.saved[name]))
            dtypes[name] = headers.dtype(layout.saved[name])
        elif base_name in base:
            names[name], shapes[name], dtypes[name] = (
                base_name,
                tuple(base.shape(base_name)),
                base.dtype(base_name),
            )
        elif name in parameters:
            raise CandidateFormatError(
                f"its merged model needs {name}, which neither the base nor the adapter has: train the LoRA with "
                "modules_to_save for the task head (peft does this for task_type SEQ_CLS)"
            )
    for weight in layout.modules:
        if weight not in names or names[weight] is None:
            raise CandidateFormatError(f"it adapts {weight}, which the base does not have")
    return names, shapes, dtypes


def open_lora_candidate(folder: Path, base, base_source) -> tuple[dict[str, Any], LoraSource]:
    """`(merged config, LoraSource)` for the adapter in `folder`, checked against the base first.

    Only `adapter_config.json` is read until the adapter is known to be a LoRA of `base` that can be souped.
    """
    adapter = read_adapter_config(folder)
    check_adapter(adapter, base.id, base.local_dir)
    headers = TensorSource(folder, weights_name=ADAPTER_WEIGHTS)
    layout = read_layout(adapter, headers)
    config = merged_config(folder, adapter, base.config, layout, headers)
    merged = merged_tensors(config, base_source, layout, headers)
    return config, LoraSource(folder, adapter, headers, layout, base_source, merged)
