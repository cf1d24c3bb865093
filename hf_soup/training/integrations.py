"""`transformers.Trainer` integration: fill a *pot* of soup ingredients from training runs and sweeps.

Not imported by `hf_soup/__init__`, so `import hf_soup` stays light.

```python
>>> from hf_soup.training.integrations import SoupCallback
>>> trainer = Trainer(model_init=model_init, args=args, train_dataset=train, eval_dataset=dev,
...                   callbacks=[SoupCallback("./pot")])
>>> trainer.hyperparameter_search(backend="optuna", n_trials=8)   # every trial adds one ingredient
```

then `hf-soup --base BASE --candidates "./pot/*" ...`. Each ingredient is a `save_pretrained` folder (weights,
config, tokenizer) plus `hf_soup_ingredient.json`: the TrainingArguments that differ from the defaults, the trial's
parameters under `hyperparameter_search`, the run's last evaluation metrics, and the base it came from.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainingArguments

from ..results import INGREDIENT_FILE

# Where a run writes, not how it trains: left out of the recorded hyperparameters.
_NOT_HYPERPARAMETERS = {
    "output_dir",
    "logging_dir",
    "run_name",
    "hub_model_id",
    "hub_token",
    "push_to_hub_token",
}


def _defaults() -> dict[str, Any]:
    """TrainingArguments' declared defaults. Read from the dataclass fields: building a second TrainingArguments
    would set up devices again and reset the accelerate state of the Trainer that is running."""
    defaults = {}
    for item in dataclasses.fields(TrainingArguments):
        if item.default is not dataclasses.MISSING:
            defaults[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            defaults[item.name] = item.default_factory()
    return {key: getattr(value, "value", value) for key, value in defaults.items()}


def changed_arguments(args: TrainingArguments) -> dict[str, Any]:
    """The TrainingArguments of a run that differ from the defaults (secrets and paths left out)."""
    defaults = _defaults()

    def same(default, value) -> bool:
        # __post_init__ normalizes some defaults: None/""/False to []/{}, accelerator_config None to its dict.
        return (
            default == value or (not default and not value) or (default is None and isinstance(value, dict))
        )

    return {
        key: value
        for key, value in args.to_dict().items()
        if key not in _NOT_HYPERPARAMETERS
        and "token" not in key
        and key in defaults
        and not same(defaults[key], value)
    }


def _last_metrics(log_history: list[dict]) -> dict[str, float]:
    for entry in reversed(log_history):
        metrics = {k: v for k, v in entry.items() if k.startswith("eval_")}
        if metrics:
            return metrics
    return {}


class SoupCallback(TrainerCallback):
    """Saves each run's model as a soup ingredient in `pot` when training ends.

    With `load_best_model_at_end`, the Trainer has loaded the best checkpoint by then, so the best model is saved;
    otherwise the final one. Only the main process writes; each ingredient lands atomically (temp folder + rename).

    Args:
        pot (`str` or `Path`): the folder that collects ingredients (created if needed).
        base (`str`, *optional*): the pretrained model the runs start from; defaults to the model's
            `config._name_or_path`.
    """

    def __init__(self, pot: str | Path, base: str | None = None):
        self.pot = Path(pot)
        self.base = base

    def _name(self, args: TrainingArguments, state) -> str:
        trial = "trial" if state.trial_params is not None else None  # hyperparameter_search runs
        label = state.trial_name or trial or args.run_name or Path(args.output_dir).name or "run"
        label = re.sub(r"[^\w.\-]+", "-", str(label)).strip("-") or "run"
        taken = {p.name for p in self.pot.iterdir()} if self.pot.exists() else set()
        name, index = label, 1
        while name in taken:
            index += 1
            name = f"{label}-{index}"
        return name

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        self.pot.mkdir(parents=True, exist_ok=True)
        name = self._name(args, state)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.pot))
        try:
            model.save_pretrained(staging)
            if processing_class is not None:
                processing_class.save_pretrained(staging)
            record = {
                "base": self.base or getattr(model.config, "_name_or_path", None),
                "saved": "best" if args.load_best_model_at_end and state.best_model_checkpoint else "final",
                "best_model_checkpoint": state.best_model_checkpoint,
                "best_metric": state.best_metric,
                "metric_for_best_model": args.metric_for_best_model,
                "global_step": state.global_step,
                "trial_name": state.trial_name,
                "trial_params": state.trial_params,
                "hyperparameters": changed_arguments(args),
                "metrics": _last_metrics(state.log_history),
            }
            (staging / INGREDIENT_FILE).write_text(
                json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
            )
            staging.rename(self.pot / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


__all__ = ["INGREDIENT_FILE", "SoupCallback", "changed_arguments"]
