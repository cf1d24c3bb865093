"""Read a mergekit YAML config (`mergekit-yaml merge.yml out/`) as hf-soup options.

    hf-soup --mergekit-config merge.yml --output soup/                 # the same tensors as mergekit-yaml
    hf-soup --mergekit-config merge.yml --dataset val.csv ... --output soup/   # plus the scores and the card

Supported: `models` (each a `model`, a local path or a Hub id with an optional `@revision`, and its `parameters`:
`weight`, `density`), `base_model`, `merge_method` (`task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `slerp`,
`model_stock`, and `linear` with equal weights), the method's `parameters` (`lambda`, `normalize`, `t`), `dtype` and
`out_dtype` (hf-soup always accumulates in float32 and writes `out_dtype`, else `dtype`), and `tokenizer_source`
(`base` or `union`). Anything else (`slices`, gradient lists, `filter`, other methods or keys) is refused with one
message that names it, before anything is read or written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError

METHODS = {
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_linear": "dare_linear",
    "dare_ties": "dare_ties",
    "slerp": "slerp",
    "model_stock": "stock",
    "linear": "uniform",
}
TOP_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source"}
MODEL_PARAMETERS = {"weight", "density"}
METHOD_PARAMETERS = {
    "task_arithmetic": {"lambda", "normalize"},
    "ties": {"lambda", "normalize"},
    "dare_linear": {"lambda", "normalize"},
    "dare_ties": {"lambda", "normalize"},
    "slerp": {"t"},
    "model_stock": set(),
    "linear": {"normalize"},
}
DTYPES = {"float32", "bfloat16", "float16"}


def _refuse(path: Path, what: str) -> ConfigError:
    return ConfigError(
        f"{path}: {what} is not supported by hf-soup's --mergekit-config; nothing was written."
    )


def _scalar(path: Path, where: str, value: Any, kind: type) -> Any:
    """A plain value; a list (a gradient over layers) or a mapping (a `filter`) is refused, by name."""
    if isinstance(value, list):
        raise _refuse(path, f"a gradient list for {where} ({value})")
    if isinstance(value, dict):
        named = (
            "a `filter`" if any("filter" in str(k) for k in value) or "filter" in str(value) else "a mapping"
        )
        raise _refuse(path, f"{named} for {where} ({value})")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {where} must be true or false, got {value!r}.")
        return value
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: {where} must be a number, got {value!r}.") from None


def _model(path: Path, entry: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    if not isinstance(entry, dict) or "model" not in entry:
        raise ConfigError(
            f"{path}: each entry of `models` needs a `model` (a path or a Hub id), got {entry!r}."
        )
    extra = sorted(set(entry) - {"model", "parameters"})
    if extra:
        raise _refuse(path, f"the model key {extra[0]!r}")
    model = entry["model"]
    if not isinstance(model, str):
        raise _refuse(path, f"the model reference {model!r} (only a path or a Hub id)")
    if "+" in model:
        raise _refuse(path, f"a LoRA applied on the fly ({model}); give the adapter folder as its own model")
    parameters = entry.get("parameters") or {}
    unknown = sorted(set(parameters) - MODEL_PARAMETERS)
    if unknown:
        raise _refuse(path, f"the model parameter {unknown[0]!r} (of {model})")
    return model, {k: _scalar(path, f"{k} of {model}", v, float) for k, v in parameters.items()}


def _per_model(values: dict[str, float]) -> str:
    return ",".join(f"{model}={value!r}" for model, value in values.items())


def _load(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--mergekit-config {path}: no such file.") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--mergekit-config {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"--mergekit-config {path} is not a mergekit config (a mapping with `merge_method`)."
        )
    return data


def mergekit_options(path: str | Path) -> dict[str, Any]:
    """The `SoupConfig` / `cook()` keywords a mergekit YAML config means: `base`, `candidates`, `recipe`, the
    recipe's options, `dtype` and `vocab`.

    Raises:
        ConfigError: the file is not a mergekit config, or uses a feature hf-soup does not support (named).
    """
    path = Path(path)
    data = _load(path)
    for key in data:
        if key not in TOP_KEYS:
            raise _refuse(path, "`slices`" if key == "slices" else f"the key {key!r}")
    method = data.get("merge_method")
    if method not in METHODS:
        raise _refuse(path, f"merge_method {method!r} (supported: {', '.join(METHODS)})")
    models = dict(_model(path, entry) for entry in data.get("models") or [])
    base = data.get("base_model")
    if not isinstance(base, str):
        raise ConfigError(
            f"{path}: hf-soup needs `base_model` (the model the others were fine-tuned from), also for {method}."
        )
    parameters = data.get("parameters") or {}
    unknown = sorted(set(parameters) - METHOD_PARAMETERS[method])
    if unknown:
        raise _refuse(path, f"the {method} parameter {unknown[0]!r}")
    options: dict[str, Any] = {"base": base, "recipe": METHODS[method]}
    if method == "slerp":  # from the base model (t = 0) to the other one
        options["candidates"] = [m for m in models if m != base]
        if "t" in parameters:
            options["t"] = _scalar(path, "t", parameters["t"], float)
    elif method == "linear" and base in models:
        # mergekit's linear averages base_model in when it is listed (it asks for its weight): with n fine-tunes and
        # equal weights that is θ_base + Σ (θ_i − θ_base) / (n + 1), task arithmetic at weight 1/(n + 1) each.
        options.update(_task_vector_options(path, method, models, parameters))
        candidates = [m for m in models if m != base]
        weights = _per_model({m: 1 / len(models) for m in candidates})
        options.update(recipe="task_arithmetic", candidates=candidates, weights=weights)
    else:
        candidates = {m: p for m, p in models.items() if m != base}
        options["candidates"] = list(candidates)
        options.update(_task_vector_options(path, method, candidates, parameters))
    options.update(_dtype_and_vocab(path, data))
    return options


def _task_vector_options(
    path: Path, method: str, models: dict[str, dict], parameters: dict
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    weights = {m: p["weight"] for m, p in models.items() if "weight" in p}
    densities = {m: p["density"] for m, p in models.items() if "density" in p}
    if method in ("model_stock", "linear"):
        if len(set(weights.values())) > 1 or densities:
            raise _refuse(
                path,
                f"{method} with per-model weights or densities (hf-soup's {METHODS[method]} is unweighted)",
            )
        if parameters.get("normalize", True) is not True:
            raise _refuse(path, f"{method} with normalize: false (a sum of the models, not their average)")
        return options
    if weights:
        options["weights"] = _per_model({m: weights.get(m, 1.0) for m in models})
    if densities:
        if method == "task_arithmetic":
            raise _refuse(
                path, "`density` with task_arithmetic (mergekit ignores it there; use ties or dare_*)"
            )
        options["density"] = _per_model({m: densities.get(m, 1.0) for m in models})
    if "lambda" in parameters:
        options["lambda_"] = _scalar(path, "lambda", parameters["lambda"], float)
    if "normalize" in parameters:
        options["normalize"] = _scalar(path, "normalize", parameters["normalize"], bool)
    return options


def _dtype_and_vocab(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        if dtype not in DTYPES:
            raise _refuse(path, f"dtype {dtype!r} (supported: {', '.join(sorted(DTYPES))})")
        options["dtype"] = dtype
    source = data.get("tokenizer_source")
    if source is not None:
        if source not in ("base", "union"):
            raise _refuse(path, f"tokenizer_source {source!r} (supported: base, union)")
        options["vocab"] = source
    return options
