"""`hf-soup`: one console script with verbs (`cook` is the default). Also runs as `hf soup`.

Errors print one line and exit with status 2; set `HF_SOUP_DEBUG=1` for the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import threading
import typing
from typing import Any

# Before torch is imported, which reads it once: torch's CPU tensors of 2 MB and more then sit in transparent huge
# pages, so reading, converting and mixing gigabytes of weights takes 512 times fewer page faults (a rerun of
# 4 × 1.1 B bf16: 16.4 s → 11.5 s, system time 15.5 s → 6.7 s). THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .config import SoupConfig, split_options
from .errors import EXIT_CODE, ConfigError, HfSoupError
from .recipes import RECIPES, option_owners
from .version import __version__

VERBS = ("cook", "check", "evaluate", "push", "reproduce", "demo", "sweep", "convert-gguf")
MISMATCH_EXIT_CODE = 1
# The `SoupConfig` fields that `hf-soup evaluate` takes.
EVALUATE_OPTIONS = (
    "task",
    "dataset",
    "text_column",
    "text_pair_column",
    "label_column",
    "regression",
    "positive_label",
    "extra_metrics",
    "image_column",
    "selection_split",
    "report_split",
    "selection_fraction",
    "seed",
    "max_eval_examples",
    "max_length",
    "batch_size",
)
FORMATS = ("human", "json")


MERGEKIT_FLAG = "--mergekit-config"


def _flag(name: str) -> str:
    """`--learn-lr` for `learn_lr`; a trailing underscore (`lambda_`, a Python keyword) is not part of the flag."""
    return "--" + name.rstrip("_").replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add one flag per `SoupConfig` field, so the CLI and the Python API cannot drift apart."""
    _add_fields(parser, SoupConfig, only)


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """Add each recipe's own options (its `Options` fields), one group per recipe, from the registry. A flag
    that is not given is left out of the namespace, so the recipe's default applies (and is recorded)."""
    seen: set[str] = set()
    owners = option_owners()
    for cls in RECIPES.values():
        fields = [item.name for item in dataclasses.fields(cls.Options) if item.name not in seen]
        if fields:
            users = [recipe for recipe in RECIPES if any(recipe in owners[f] for f in fields)]
            group = parser.add_argument_group(f"{cls.pretty_name()} options (--recipe {', '.join(users)})")
            _add_fields(group, cls.Options, tuple(fields), suppress=True)
            seen.update(fields)


def _add_fields(parser, cls, only: tuple[str, ...] | None = None, suppress: bool = False) -> None:
    """One flag per field of the dataclass `cls`: the type and choices from its annotation (a `Literal` gives the
    choices), the help and argparse settings from its metadata."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        meta = dict(item.metadata)
        if (only is not None and item.name not in only) or not meta.pop("cli", True):
            continue
        kwargs: dict[str, Any] = {"help": meta.pop("help"), **_argument_type(hints[item.name])}
        default = item.default
        if default is True:  # a switch that is on: --x / --no-x
            kwargs["action"] = argparse.BooleanOptionalAction
        elif default not in (None, False, dataclasses.MISSING) and kwargs.get("action") != "store_true":
            kwargs["help"] += f" (default: {default})"
        if suppress:
            kwargs["default"] = argparse.SUPPRESS
        elif default is not dataclasses.MISSING:
            kwargs["default"] = default
        parser.add_argument(_flag(item.name), dest=item.name, **{**kwargs, **meta})


def _argument_type(hint) -> dict[str, Any]:
    """argparse settings for a field annotated `hint`: a switch, a typed value, or a choice of a `Literal`."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if hint is bool:
        return {"action": "store_true"}
    if args == [bool]:  # `bool | None`: --x / --no-x, None (the recipe's own default) when neither is given
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is typing.Literal:
        return {"choices": typing.get_args(hint)}
    if hint in (int, float) or (len(args) == 1 and args[0] in (int, float)):
        return {"type": hint if hint in (int, float) else args[0]}
    return {}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", choices=FORMATS, default="human", help="human tables, or one JSON object on stdout"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also the libraries' own console: Trainer's bars and logs, transformers' loading and saving bars",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-soup",
        description="Model soups for Hugging Face checkpoints (Wortsman et al. 2022, arXiv 2203.05482). "
        "`hf-soup --base B --candidates P...` means `hf-soup cook ...`.",
    )
    parser.add_argument("--version", action="version", version=f"hf-soup {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="{" + ",".join(VERBS) + "}")

    _add_cook(verbs)

    check = verbs.add_parser("check", help="compatibility only; reads no tensor data")
    add_config_arguments(
        check, only=("base", "candidates", "strict", "allow_pickle", "trust_remote_code", "soup")
    )
    check.add_argument(
        "--diagnostics",
        action="store_true",
        help="also read the weights: each candidate's distance to the base and the angles between fine-tuning "
        "directions; flags candidates that do not share the base's initialisation (fatal with --strict)",
    )
    check.add_argument("--heatmap", metavar="PNG", help="with --diagnostics: write the angle heatmap here")
    _common(check)

    evaluate = verbs.add_parser("evaluate", help="score one model folder on the report split(s)")
    evaluate.add_argument("model", help="a model folder")
    add_config_arguments(evaluate, only=EVALUATE_OPTIONS)
    _common(evaluate)

    push = verbs.add_parser("push", help="push a soup folder to the Hub as one commit")
    push.add_argument("folder", help="a soup folder written by `hf-soup cook --output`")
    push.add_argument("--to", required=True, dest="push_to", metavar="ORG/NAME", help="the Hub repo")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--overwrite", action="store_true", help="replace other files in the repo")
    _common(push)

    reproduce = verbs.add_parser(
        "reproduce", help="rebuild a soup from its soup.json and check every tensor hash"
    )
    reproduce.add_argument("target", metavar="REPO_OR_DIR[@REV]", help="a soup folder or a Hub repo")
    _common(reproduce)

    _add_sweep(verbs)
    _add_convert_gguf(verbs)
    _add_demo(verbs)
    return parser


def _add_cook(verbs) -> None:
    cook = verbs.add_parser("cook", help="check, score, soup, evaluate and write a soup (the default verb)")
    add_config_arguments(cook)
    add_recipe_arguments(cook)
    cook.add_argument(
        MERGEKIT_FLAG,
        metavar="MERGE.yml",
        help="Read the base, the models, the method and its parameters from a mergekit YAML config (instead of "
        "--base, --candidates, --recipe and its options); add --dataset/--task to score the merge.",
    )
    cook.add_argument(
        "--profile",
        action="store_true",
        help="print each stage's seconds and the tensor bytes it read from the inputs (on stderr; with "
        "--format json they are the report's `timings` and `bytes_read`)",
    )
    _common(cook)


def _add_demo(verbs) -> None:
    demo = verbs.add_parser(
        "demo", help="fine-tune MiniLM variants on bundled reviews and soup them, offline"
    )
    demo.add_argument("--quick", action="store_true", help="a tiny run for tests (about a minute)")
    demo.add_argument(
        "--output", default="./soup-demo", help="where to write the soup (default: ./soup-demo)"
    )
    demo.add_argument(
        "--workdir",
        default=None,
        help="where the fine-tuned variants go, kept and reused on a rerun (default: <output>-runs/ beside the soup)",
    )
    _common(demo)


def _add_convert_gguf(verbs) -> None:
    convert = verbs.add_parser(
        "convert-gguf",
        help="write a GGUF file as a plain transformers folder (safetensors), to use as a base",
    )
    convert.add_argument("gguf", metavar="FILE.gguf", help="the GGUF file")
    convert.add_argument("--output", required=True, metavar="DIR", help="the folder to write")
    convert.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="how the dequantized weights are stored (default: float32, exact)",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _common(convert)


def _add_sweep(verbs) -> None:
    sweep = verbs.add_parser(
        "sweep",
        help="fine-tune K variants of one base the way soups need (a shared "
        "linear-probe head, a random hyperparameter grid, the selection rows held out)",
    )
    add_config_arguments(
        sweep,
        only=(
            "base",
            "dataset",
            "task",
            "text_column",
            "text_pair_column",
            "image_column",
            "label_column",
            "selection_fraction",
            "seed",
            "max_length",
        ),
    )
    sweep.add_argument("--output", required=True, metavar="DIR", help="where start/ and runs/ go (resumable)")
    sweep.add_argument("--variants", type=int, default=8, help="how many variants to draw (default: 8)")
    sweep.add_argument(
        "--head",
        choices=("probe", "random"),
        default="probe",
        help="the shared head: a linear probe on frozen features (default), or seeded random",
    )
    sweep.add_argument(
        "--train-rows", type=int, default=None, help="train on a seeded subsample of this many rows"
    )
    _common(sweep)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each message (it may be replaced after setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging(quiet: bool, verbose: bool = False) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    package_logger = logging.getLogger("hf_soup")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.WARNING if quiet else logging.INFO)
    package_logger.propagate = False
    # Through the libraries' environment variables, read when they are imported (importing `datasets` here would
    # cost a plain merge, which never uses it, most of a second); directly if they are imported already.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    for name in ("transformers", "datasets"):
        if name in sys.modules:
            sys.modules[name].logging.set_verbosity_error()
    if quiet:
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    elif not verbose:
        from .progress import library_bars_off

        library_bars_off()


def _main_process() -> bool:
    """False on every rank but 0 under `accelerate launch`: those ranks compute, and print or write nothing."""
    from .runtime import process_state

    return process_state().is_main_process


def _emit(args, payload: dict, human: str) -> None:
    if not _main_process():
        return
    if args.format == "json":
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        print(human)


def _config_from(args) -> SoupConfig:
    names = set(SoupConfig.__dataclass_fields__) | {
        item.name for cls in RECIPES.values() for item in dataclasses.fields(cls.Options)
    }
    return SoupConfig(**split_options({k: v for k, v in vars(args).items() if k in names}, {}))


def _run(args, argv: list[str]) -> int:
    verbs = {
        "check": _check,
        "evaluate": _evaluate,
        "push": _push,
        "reproduce": _reproduce,
        "demo": _demo,
        "sweep": _sweep,
        "convert-gguf": _convert_gguf,
    }
    if args.verb in verbs:
        return verbs[args.verb](args)
    return _cook(args, argv)


def _cook(args, argv: list[str]) -> int:
    from .api import cook
    from .reporting.tables import compatibility_table, lora_summary, profile_table, soup_table

    result = cook(_config_from(args), command="hf-soup " + shlex.join(argv), quiet=args.quiet)
    if _main_process():
        print(compatibility_table(result.compatibility.rows()), file=sys.stderr)
    summary = result.summary
    count = len(summary.mixture.ingredients)
    human = (
        soup_table(summary)
        if summary.scored
        else f"{summary.recipe.pretty_name} of {count} model{'' if count == 1 else 's'} (no data)."
    )
    if summary.lora:
        human += "\n" + lora_summary(summary.lora)
    if result.output:
        human += f"\nSoup written to {result.output}"
    if result.push:
        human += f"\nPushed: {result.push['commit_url']}"
    if args.profile and _main_process():
        print(profile_table(result.timings, result.bytes_read), file=sys.stderr)
    _emit(args, result.report, human)
    return 0


def _evaluate(args) -> int:
    from .scoring.preparation import evaluate_model

    scores = evaluate_model(args.model, _config_from_eval(args), quiet=args.quiet)
    human = "\n".join(
        f"{split}: "
        + ", ".join(f"{k}={v:.4f}" for k, v in s["metrics"].items())
        + f", loss={s['loss']:.4f} (n={s['n']})"
        for split, s in scores.items()
    )
    _emit(args, scores, human)
    return 0


def _reproduce(args) -> int:
    from .pipeline.reproduce import reproduce
    from .reporting.tables import format_table

    result = reproduce(args.target, quiet=args.quiet)
    rows = [
        [g, "pass" if v["ok"] else "FAIL", f"{v['matched']}/{v['tensors']}"] for g, v in result.groups.items()
    ]
    human = format_table(["tensor group", "result", "tensors matching"], rows)
    human += f"\n{'Reproduced bit-exactly' if result.ok else 'MISMATCH'}: {args.target}"
    _emit(args, result.to_dict(), human)
    return 0 if result.ok else MISMATCH_EXIT_CODE


def _demo(args) -> int:
    from .demo import run_demo
    from .reporting.tables import soup_table

    result = run_demo(
        quick=args.quick, output=args.output, workdir=args.workdir, quiet=args.quiet, verbose=args.verbose
    )
    _emit(args, result.report, soup_table(result.summary) + f"\nSoup written to {result.output}")
    return 0


def _sweep(args) -> int:
    from .evaluation.tasks import is_image_task
    from .training.sweep import sweep

    folder = sweep(
        args.base,
        args.dataset,
        text_column=args.text_column,
        label_column=args.label_column,
        text_pair_column=args.text_pair_column,
        task=args.task,
        image_column=args.image_column,
        output=args.output,
        variants=args.variants,
        head=args.head,
        selection_fraction=args.selection_fraction,
        seed=args.seed,
        max_length=args.max_length,
        train_rows=args.train_rows,
        quiet=args.quiet,
        verbose=args.verbose,
    )
    runs = sorted(p.name for p in (folder / "runs").iterdir() if p.is_dir() and not p.name.startswith("."))
    if is_image_task(args.task):
        columns = f"--task {args.task}" + "".join(
            f" --{flag}-column {value}"
            for flag, value in (("image", args.image_column), ("label", args.label_column))
            if value
        )
    else:
        pair = f" --text-pair-column {args.text_pair_column}" if args.text_pair_column else ""
        columns = f"--text-column {args.text_column}{pair} --label-column {args.label_column}"
    command = (
        f'hf-soup --base {folder / "start"} --candidates "{folder / "runs"}/*" --dataset {args.dataset} '
        f"{columns} --selection-fraction {args.selection_fraction} --seed {args.seed} --recipe auto"
    )
    human = f"{len(runs)} variants in {folder / 'runs'}, all from {folder / 'start'}. Soup them with:\n  {command}"
    _emit(args, {"output": str(folder), "runs": runs, "next": command}, human)
    return 0


def _check(args) -> int:
    from .api import check, check_with_diagnostics
    from .errors import IncompatibleCandidatesError
    from .reporting.tables import compatibility_table, format_table

    if not args.diagnostics:
        report = check(args.base, args.candidates, args.allow_pickle, args.trust_remote_code, soup=args.soup)
        _emit(args, report.to_dict(), compatibility_table(report.rows()))
        report.raise_if_unusable(strict=args.strict)
        return 0
    from .candidates.diagnostics import diagnostics_table
    from .reporting.plots import write_angle_heatmap

    report, diagnostics = check_with_diagnostics(
        args.base, args.candidates, args.allow_pickle, args.quiet, args.trust_remote_code, soup=args.soup
    )
    if args.heatmap:
        write_angle_heatmap(args.heatmap, diagnostics.to_dict())
    human = [compatibility_table(report.rows()), "", format_table(*diagnostics_table(diagnostics))]
    human += [f"WARNING: {message}" for message in diagnostics.warnings()]
    if args.heatmap:
        human.append(f"Heatmap written to {args.heatmap}")
    _emit(args, {**report.to_dict(), "diagnostics": diagnostics.to_dict()}, "\n".join(human))
    if args.strict and diagnostics.flagged:
        raise IncompatibleCandidatesError(
            f"--strict: {len(diagnostics.flagged)} candidate(s) do not look fine-tuned from {args.base} "
            f"({', '.join(diagnostics.flagged)}). Remove them, or check --base."
        )
    return 0


def _push(args) -> int:
    from pathlib import Path

    from huggingface_hub import HfApi

    from .candidates.hub import check_push_target, commit_message, push

    folder = Path(args.folder)
    commit_message(folder)  # refuses a folder without soup.json, before any Hub call
    api = HfApi()
    check_push_target(args.push_to, args.overwrite, api)
    pushed = push(folder, args.push_to, args.private, api)
    _emit(args, pushed, f"Pushed: {pushed['commit_url']}")
    return 0


def _convert_gguf(args) -> int:
    from .checkpoints.gguf import convert_gguf

    output = convert_gguf(args.gguf, args.output, dtype=args.dtype, overwrite=args.overwrite)
    _emit(args, {"output": str(output), "dtype": args.dtype}, f"Wrote {output}")
    return 0


def _config_from_eval(args) -> SoupConfig:
    """The evaluation options as a `SoupConfig` (same defaults and checks as a soup run), scoring `args.model`."""
    return SoupConfig(
        base=args.model, candidates=[args.model], **{k: getattr(args, k) for k in EVALUATE_OPTIONS}
    )


def with_mergekit_config(argv: list[str]) -> list[str]:
    """`argv` with `--mergekit-config FILE` replaced by the flags the file means (`mergekit_yaml.py`).

    Raises:
        ConfigError: the file cannot be read as a supported mergekit config, or a flag it sets is also given.
    """
    if argv[:1] != ["cook"] or not any(a == MERGEKIT_FLAG or a.startswith(MERGEKIT_FLAG + "=") for a in argv):
        return argv
    from .mergekit_yaml import mergekit_options

    rest, path = [], None
    for index, arg in enumerate(argv):
        if arg.startswith(MERGEKIT_FLAG + "="):
            path = arg.split("=", 1)[1]
        elif arg == MERGEKIT_FLAG:
            path = argv[index + 1] if index + 1 < len(argv) else None
        elif index == 0 or argv[index - 1] != MERGEKIT_FLAG:
            rest.append(arg)
    if not path:
        raise ConfigError(f"{MERGEKIT_FLAG} needs a file: {MERGEKIT_FLAG} merge.yml.")
    flags: list[str] = []
    for key, value in mergekit_options(path).items():
        flag = _flag(key)
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            raise ConfigError(f"{MERGEKIT_FLAG} {path} sets {flag}; drop {flag} from the command line.")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return [*rest, *flags]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in (*VERBS, "-h", "--help", "--version"):
        argv = ["cook", *argv]
    if not argv:
        argv = ["--help"]
    parser = build_parser()
    try:
        argv = with_mergekit_config(argv)
    except HfSoupError as error:
        print(f"hf-soup: error: {error}", file=sys.stderr)
        return EXIT_CODE
    args = parser.parse_args(argv)
    _setup_logging(args.quiet or not _main_process(), args.verbose)
    with _interrupts_recorded() as interrupted:
        try:
            return _run(args, argv)
        except HfSoupError as error:
            if os.environ.get("HF_SOUP_DEBUG", "") not in ("", "0"):
                raise
            if _main_process():  # every rank fails the same way; one says so
                print(f"hf-soup: error: {error}", file=sys.stderr)
            return EXIT_CODE
        except BaseException as error:
            # Ctrl-C raises KeyboardInterrupt, but when it lands inside a C extension (safetensors building a
            # tensor, say) the extension may turn it into another exception: after a SIGINT, whatever surfaces is
            # the interrupt.
            if not (isinstance(error, KeyboardInterrupt) or interrupted):
                raise
            print("hf-soup: interrupted; nothing was written.", file=sys.stderr)
            return 130


@contextlib.contextmanager
def _interrupts_recorded():
    """SIGINT still raises KeyboardInterrupt; the yielded list becomes non-empty once one has arrived.

    Nothing changes when SIGINT is ignored (a background job), handled by someone else, or off the main thread.
    """
    seen: list[bool] = []
    previous = signal.getsignal(signal.SIGINT)
    if (
        previous is not signal.default_int_handler
        or threading.current_thread() is not threading.main_thread()
    ):
        yield seen
        return

    def handler(signum, frame):
        seen.append(True)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
