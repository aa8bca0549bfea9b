"""``hf-sta``: merge, forget, score, push and inspect from the command line, over the same recipes as the Python API.

```
hf-sta merge recipe.yaml [--dry-run] [--output-dir D] [--overwrite]
hf-sta forget recipe.yaml [--dry-run] [--output-dir D] [--overwrite]
hf-sta importance --base B --model TASK=PATH --data FILE --output importance.safetensors
hf-sta finetune --base B --data FILE --output-dir D [--optimizer adamw|sam|asam] [--rho R]
hf-sta push DIR REPO_ID [--private] [--create-pr] [--revision R] [--commit-message M]
hf-sta inspect DIR
hf-sta methods
```

Every failure is one line on stderr naming the field, file or argument (``hf-sta: error: merge.density must be in
(0, 1], got 1.5``) and exit status 2; ``-vv`` adds the traceback. The cases and what the user sees:
``docs/fault-matrix.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import CheckpointError, ConfigError, HfStaError

logger = logging.getLogger(__name__)

PROG = "hf-sta"
EXIT_USAGE = 2


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option with its default, and epilogs kept as written."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose epilog may be a callable, called only when the help is printed.

    ``merge --help`` lists the registered methods, which needs the method modules (and torch); building the parser,
    and ``hf-sta --help``, must not import them (fast start).
    """

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        """A usage error is one line, like every other failure (argparse prints the usage first)."""
        self.exit(EXIT_USAGE, f"{PROG}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


# The importance metrics (``hf_sta.importance.METRICS``; named here so that building the parser imports no torch).
IMPORTANCE_METRICS = ("taylor", "taylor_delta", "fisher", "magnitude")


def _out(line: str = "") -> None:
    """The CLI's own output (results), on stdout; diagnostics go through logging to stderr."""
    sys.stdout.write(line + "\n")


# -- help texts -------------------------------------------------------------------------------------------------------
def _describe_parameter(parameter: Any) -> str:
    kind = parameter.type.__name__
    details = [f"{kind}", f"default {parameter.shown_default}"]
    if parameter.choices:
        details.append("one of " + ", ".join(map(str, parameter.choices)))
    elif parameter.interval:
        details.append(f"in {parameter.interval}")
    return f"{parameter.name} ({'; '.join(details)}): {parameter.doc}"


def methods_text(indent: str = "  ") -> str:
    """Every registered merge method with its paper and parameters (``hf-sta methods`` and ``merge --help``)."""
    from .methods import get_merge_method, list_merge_methods

    lines = []
    for name in list_merge_methods():
        spec = get_merge_method(name)
        flags = [
            flag for flag, on in (("needs importance", spec.requires_importance), ("random", spec.stochastic)) if on
        ]
        lines.append(f"{indent}{name}: {spec.pretty_name}" + (f" [{', '.join(flags)}]" if flags else ""))
        if spec.description:
            lines.append(f"{indent * 3}{spec.description}")
        paper = spec.paper_title + (f" <{spec.paper_url}>" if spec.paper_url else "")
        lines.append(f"{indent * 3}paper: {paper}")
        if spec.default_scaling != 1.0:
            lines.append(f"{indent * 3}default scaling: {spec.default_scaling:g}")
        if not spec.parameters:
            lines.append(f"{indent * 3}parameters: none")
        for parameter in spec.parameters:
            lines.append(f"{indent * 3}{_describe_parameter(parameter)}")
    return "\n".join(lines)


_MERGE_EPILOG = """\
The recipe (YAML):
  base_model: org/base                     # folder or Hub repo id
  models: {{news: ./ft-news, topic: org/ft-topic}}
  adapters: {{chat: ./lora-chat}}            # PEFT LoRA adapters (optional)
  task_vectors: {{site1: tv.safetensors}}    # shipped task vectors (optional)
  importance:                              # per task, for method sta
    news: {{data: news.jsonl, text_column: text, metric: taylor, num_samples: 256}}
    topic: {{path: topic_importance.safetensors}}
  merge: {{method: sta, scaling: 1.0, params: {{density: 0.3}}}}
  output_dir: merged
  push_to_hub: {{repo_id: me/merged, private: true}}

Merge fields: method, scaling, weights (task -> weight, a list, or num_samples), tasks, params, seed, torch_dtype,
max_shard_size, output_format (full, or adapter: a PEFT LoRA of the merged delta by truncated SVD), max_rank, energy
(the adapter's LoRA rank per module). The method's parameters go under merge.params, or directly in merge:.

Merge methods and their parameters:
{methods}
"""

_FORGET_EPILOG = """\
The recipe (YAML) has a forget: section instead of merge:
  base_model: org/base
  models: {news: ./ft-news}
  importance: {news: {data: news.jsonl}}
  forget: {task: news, method: sta, scaling: 1.0, target: ./merged, params: {density: 0.2}}
  output_dir: without-news

forget fields: task, method (sta: subtract the task's important entries; negation: the whole task vector), scaling,
target (empty: the base; a task name: its fine-tuned model; a folder / repo id: e.g. a merged model), params (STA's
threshold, density, density_scope, normalize), torch_dtype, max_shard_size, as_adapter (write the edit as a PEFT
LoRA adapter over the base: disable it to restore the model), max_rank, energy (the adapter's LoRA ranks).
"""


# -- subcommands ------------------------------------------------------------------------------------------------------
def _load_recipe(args: argparse.Namespace, operation: str):
    from .recipe import Recipe

    recipe = Recipe.from_yaml(args.config, trust_remote_code=args.trust_remote_code)
    if recipe.operation != operation:
        other = recipe.operation
        raise ConfigError(f"{other}: '{args.config}' is a {other} recipe; run `{PROG} {other} {args.config}`")
    changes: dict[str, Any] = {}
    if args.output_dir is not None:
        changes["output_dir"] = str(args.output_dir)
    if args.overwrite:
        changes["overwrite"] = True
    return dataclasses.replace(recipe, **changes) if changes else recipe


def _run_recipe(args: argparse.Namespace, operation: str) -> int:
    from .recipe import run_recipe

    recipe = _load_recipe(args, operation)
    result = run_recipe(recipe, dry_run=args.dry_run)
    summary = result.summary
    params = ", ".join(f"{k}={v}" for k, v in summary["params"].items())
    method = f"{summary['method']}" + (f" ({params})" if params else "")
    if result.dry_run:
        _out(f"Dry run: {args.config} is valid; nothing was written.")
        _out(f"  base model: {summary['base_model']} ({summary['tensors']} tensors)")
        _out(f"  tasks: {', '.join(summary['tasks'])}")
        _out(f"  {operation}: {method}")
        for task, source in summary["importance"].items():
            _out(f"  importance[{task}]: {source}")
        if summary["output_format"] == "adapter":
            _out("  output_format: adapter (PEFT LoRA)")
        _out(f"  output_dir: {summary['output_dir'] or '(none)'}")
        if summary["push_to_hub"]:
            _out(f"  push_to_hub: {summary['push_to_hub']}")
        return 0
    if operation == "merge":
        _out(f"Merged {', '.join(recipe.merge.tasks or summary['tasks'])} with {method}")
    else:
        _out(f"Forgot {recipe.forget.task} with {method}, scaling {recipe.forget.scaling:g}")
    if result.output_dir is not None:
        _out(f"Wrote {result.output_dir}")
    if result.commit is not None:
        _out(f"Pushed to {result.commit.pr_url or result.commit.commit_url}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    return _run_recipe(args, "merge")


def _forget(args: argparse.Namespace) -> int:
    return _run_recipe(args, "forget")


def _compress(args: argparse.Namespace) -> int:
    from .compression.recipe import CompressRecipe, run_compress_recipe

    recipe = CompressRecipe.from_yaml(args.config)
    recipe.output_dir = str(args.output_dir) if args.output_dir is not None else recipe.output_dir
    recipe.overwrite = recipe.overwrite or args.overwrite
    merger, path = run_compress_recipe(recipe, dry_run=args.dry_run, trust_remote_code=args.trust_remote_code)
    if path is None:
        _out(f"Dry run: {args.config} is valid; tasks {', '.join(merger.tasks)}; nothing was written.")
        return 0
    record = merger.last_compression
    _out(f"Compressed for {', '.join(record['kept_tasks'])}: {record['original']['non_embedding_parameters']:,} -> "
         f"{record['compressed']['non_embedding_parameters']:,} non-embedding parameters")  # fmt: skip
    _out(f"Wrote {path}")
    return 0


def _task_source(value: str, option: str) -> tuple[str, str]:
    from .config import validate_task_name

    task, sep, source = value.partition("=")
    if not sep or not task or not source:
        raise ConfigError(f"{option}: expected TASK=PATH, got {value!r}")
    try:
        validate_task_name(task)
    except ConfigError as err:
        raise ConfigError(f"{option}: {err}") from None
    return task, source


def _as_option(error: ConfigError, fields: Sequence[str]) -> ConfigError:
    """The error with its leading config field renamed to the command-line option (``rho ...`` -> ``--rho ...``)."""
    message = str(error)
    for name in sorted(fields, key=len, reverse=True):
        if message.startswith(name):
            return ConfigError("--" + name.replace("_", "-") + message[len(name) :])
    return error


def _finetune(args: argparse.Namespace) -> int:
    from .io.checkpoints import check_output_dir
    from .recipe import load_data
    from .training import FinetuneConfig, finetune_classifier

    fields = [field.name for field in dataclasses.fields(FinetuneConfig)]
    values = {name: getattr(args, name) for name in fields}
    values["max_grad_norm"] = values["max_grad_norm"] or None  # 0: no clipping, as in TrainingArguments
    try:
        config = FinetuneConfig(**values)
    except ConfigError as err:
        raise _as_option(err, fields) from None
    check_output_dir(args.output_dir, args.overwrite)  # before loading data and training
    dataset = load_data(args.data, args.split, args.subset, field="--data")
    folder, result = finetune_classifier(
        args.base,
        dataset,
        args.output_dir,
        config,
        text_column=args.text_column,
        label_column=args.label_column,
        max_length=args.max_length,
        num_samples=args.num_samples,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        show_progress=args.verbose > 0,
    )
    rho = "" if config.resolved_rho is None else f" (rho {config.resolved_rho:g})"
    _out(f"Fine-tuned {args.base} with {config.optimizer}{rho}: {result.steps} steps, "
         f"{result.seconds_per_step:.2f} s/step, last epoch's mean loss {result.epoch_losses[-1]:.4f}")  # fmt: skip
    _out(f"Wrote {folder}")
    return 0


def _importance(args: argparse.Namespace) -> int:
    from .recipe import ImportanceConfig, Recipe, build_merger, compute_task_importance

    output = Path(args.output)
    inputs = [(option, value) for option, value in (("--model", args.model), ("--adapter", args.adapter)) if value]
    if len(inputs) != 1:
        raise ConfigError("--model: give exactly one of --model TASK=PATH or --adapter TASK=PATH")
    option, value = inputs[0]
    task, source = _task_source(value, option)
    fields = {
        "data": args.data,
        "split": args.split,
        "subset": args.subset,
        "text_column": args.text_column,
        "label_column": args.label_column,
        "metric": args.metric,
        "num_samples": args.num_samples,
        "micro_batch_size": args.micro_batch_size,
        "max_length": args.max_length,
        "torch_dtype": args.torch_dtype,
    }
    try:
        config = ImportanceConfig.from_dict(fields, path="")
    except ConfigError as err:  # name the option, not the recipe field
        message = str(err)
        for name in fields:
            if message.startswith(name):
                message = "--" + name.replace("_", "-") + message[len(name) :]
                break
        raise ConfigError(message) from None
    if output.exists() and not args.overwrite:  # argument errors first, then before the (long) calibration pass
        raise FileExistsError(f"Output file '{output}' exists; pass --overwrite to replace it.")
    group = "models" if option == "--model" else "adapters"
    recipe = Recipe(base_model=args.base, trust_remote_code=args.trust_remote_code, **{group: {task: source}})
    merger = build_merger(recipe)
    scores = compute_task_importance(merger, task, config)
    merger.save_importance(task, output, overwrite=args.overwrite)
    _out(f"Wrote the {scores.metric} importance of '{task}' ({scores.num_samples} samples) to {output}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .recipe import PushConfig

    config = PushConfig.from_dict(
        {
            "repo_id": args.repo_id,
            "private": True if args.private else None,
            "create_pr": args.create_pr,
            "revision": args.revision,
            "commit_message": args.commit_message,
        },
        path="push",
    )
    commit = config.push(args.dir)
    _out(f"Pushed {args.dir} to {commit.pr_url or commit.commit_url}")
    return 0


def _format_count(value: int) -> str:
    return f"{value:,}"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  " + "  ".join(str(cell).ljust(width) for cell, width in zip(header, widths)).rstrip()]
    for row in rows:
        lines.append("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return lines


def _layer_statistics(reader: Any) -> list[list[str]]:
    from .card import layer_of, layer_sort_key

    groups: dict[str, dict[str, Any]] = {}
    for key in reader.keys():
        group = groups.setdefault(layer_of(key), {"tensors": 0, "parameters": 0, "dtypes": set()})
        shape = reader.shape(key)
        count = 1
        for size in shape:
            count *= size
        group["tensors"] += 1
        group["parameters"] += count
        group["dtypes"].add(str(reader.dtype(key)).removeprefix("torch."))
    rows = []
    for layer in sorted(groups, key=layer_sort_key):
        group = groups[layer]
        rows.append(
            [layer, str(group["tensors"]), _format_count(group["parameters"]), ", ".join(sorted(group["dtypes"]))]
        )
    total_tensors = sum(g["tensors"] for g in groups.values())
    total_parameters = sum(g["parameters"] for g in groups.values())
    dtypes = sorted(set().union(*(g["dtypes"] for g in groups.values()))) if groups else []
    rows.append(["total", str(total_tensors), _format_count(total_parameters), ", ".join(dtypes)])
    return rows


def _importance_files(folder: Path) -> list[Path]:
    candidates = sorted((folder / "importance").glob("*.safetensors")) if (folder / "importance").is_dir() else []
    candidates += sorted(p for p in folder.glob("*.safetensors") if "importance" in p.name)
    return candidates


def _inspect(args: argparse.Namespace) -> int:
    import yaml

    from .io.checkpoints import CheckpointReader
    from .layout import CARD_NAME, RECIPE_NAME

    folder = Path(args.dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"'{folder}' is not a folder.")
    _out(f"{folder}")
    recipe_path = folder / RECIPE_NAME
    if recipe_path.is_file():
        _out(f"\nRecipe ({RECIPE_NAME}):")
        recipe = yaml.safe_load(recipe_path.read_text()) or {}
        for line in yaml.safe_dump(recipe, sort_keys=False).rstrip().splitlines():
            _out(f"  {line}")
    else:
        _out(f"\nNo {RECIPE_NAME}: not written by hf_sta.")
    reader = CheckpointReader(folder)
    _out("\nTensors per layer:")
    for line in _table(_layer_statistics(reader), ["layer", "tensors", "parameters", "dtype"]):
        _out(line)
    _print_heads(folder)
    _print_importance(folder)
    if (folder / CARD_NAME).is_file():
        _out(f"\nModel card: {folder / CARD_NAME}")
    return 0


def _print_heads(folder: Path) -> None:
    """The task heads saved under ``folder/heads/``: tensors, parameters and names of each."""
    from .io.checkpoints import CheckpointReader

    heads = sorted((folder / "heads").glob("*.safetensors")) if (folder / "heads").is_dir() else []
    if not heads:
        return
    _out("\nTask heads (heads/):")
    rows = []
    for file in heads:
        head = CheckpointReader(file)
        parameters = sum(math.prod(head.shape(key)) for key in head.keys())
        rows.append([file.stem, str(len(head.keys())), _format_count(parameters), ", ".join(head.keys())])
    for line in _table(rows, ["task", "tensors", "parameters", "names"]):
        _out(line)


def _print_importance(folder: Path) -> None:
    """Each importance file in ``folder``: its metric and data, then the mean normalised importance per layer."""
    from .card import importance_by_layer
    from .importance import ImportanceScores

    scores: dict[str, ImportanceScores] = {}
    for file in _importance_files(folder):
        try:
            loaded = ImportanceScores.load(file)
        except CheckpointError:
            continue
        task = loaded.task or file.stem
        scores[task] = loaded
        _out(f"\nImportance of '{task}' ({file.relative_to(folder)}):")
        if loaded.metric == "magnitude":
            _out("  metric magnitude (|tau|, no data)")
        else:
            _out(f"  metric {loaded.metric}, {loaded.num_samples} samples in {loaded.micro_batches} micro-batch(es)")
        if loaded.dataset_fingerprint:
            _out(f"  dataset fingerprint {loaded.dataset_fingerprint}")
    if scores:
        layers = importance_by_layer(scores)
        tasks = list(scores)
        _out("\nMean normalised importance per layer (mean over tensors of I / max I):")
        rows = [
            [layer, *(f"{per_task.get(t, float('nan')):.3f}" for t in tasks)] for layer, per_task in layers.items()
        ]
        for line in _table(rows, ["layer", *tasks]):
            _out(line)


def _methods(args: argparse.Namespace) -> int:
    _out("Merge methods (set parameters under merge.params in a recipe):")
    _out(methods_text())
    _out("\nForgetting methods: sta (STA's selection parameters, without overlap), negation (no parameters).")
    return 0


# -- parser -----------------------------------------------------------------------------------------------------------
def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _add_recipe_options(parser: argparse.ArgumentParser, operation: str) -> None:
    parser.add_argument("config", type=Path, help=f"YAML recipe with a {operation}: section")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the recipe and open every input (headers only) without computing or writing anything",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="override the recipe's output_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the models' own Python code (config auto_map); a recipe's trust_remote_code: true needs it",
    )


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}") from None
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return number


def _add_finetune_parser(commands: Any) -> None:
    """``hf-sta finetune``: the options of ``hf_sta.training.FinetuneConfig`` (same names) and the data's."""
    finetune = commands.add_parser(
        "finetune",
        help="fine-tune a classifier with AdamW, SAM or ASAM",
        description="Fine-tune a sequence classifier (AutoModelForSequenceClassification, new head) from a base "
        "checkpoint on a text dataset with AdamW or, for models you will merge, sharpness-aware SAM / ASAM (the "
        "update uses the gradient at theta + e, e = rho g/||g||; ASAM: e = rho T^2 g/||T g||, T = |theta|), and save "
        "it with its tokenizer and hf_sta_training.json (hf_sta.training.finetune_classifier).",
        formatter_class=_HelpFormatter,
    )
    finetune.add_argument("--base", required=True, default=argparse.SUPPRESS, help="base model (folder or repo id)")
    finetune.add_argument(
        "--data", required=True, default=argparse.SUPPRESS, help="a .json/.jsonl/.csv/.parquet file or a datasets name"
    )
    finetune.add_argument("--split", default="train", help="split or slice of the data, e.g. 'train[:600]'")
    finetune.add_argument("--subset", default=None, help="dataset configuration name")
    finetune.add_argument("--text-column", default="text", help="column of raw text")
    finetune.add_argument(
        "--label-column", default="label", help="column of class labels (ClassLabel, integers 0..K-1, or strings)"
    )
    finetune.add_argument("--max-length", type=_positive_int, default=128, help="truncation length")
    finetune.add_argument("--num-samples", type=_positive_int, default=None, help="use only the first rows")
    finetune.add_argument("--optimizer", default="adamw", choices=["adamw", "sam", "asam"], help="update rule")
    finetune.add_argument(
        "--rho", type=_non_negative_float, default=None, help="SAM / ASAM radius (default: 0.05 SAM, 0.5 ASAM)"
    )
    finetune.add_argument("--eta", type=_non_negative_float, default=0.0, help="ASAM offset: T = |theta| + eta")
    finetune.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate")
    finetune.add_argument("--epochs", type=_positive_int, default=2, help="passes over the data")
    finetune.add_argument("--batch-size", type=_positive_int, default=16, help="rows per step")
    finetune.add_argument("--weight-decay", type=_non_negative_float, default=0.01, help="not on biases/LayerNorm")
    finetune.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup fraction, then linear decay")
    finetune.add_argument("--max-grad-norm", type=_non_negative_float, default=1.0, help="clipping (0: none)")
    finetune.add_argument("--seed", type=int, default=0, help="head initialisation, dropout and batch order")
    finetune.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")
    finetune.add_argument(
        "--output-dir", required=True, default=argparse.SUPPRESS, type=Path, help="folder to write the classifier to"
    )
    finetune.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    finetune.set_defaults(func=_finetune)


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-sta`` argument parser (subcommands merge, forget, compress, importance, finetune, push, inspect,
    methods)."""
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="Merge fine-tuned models, adapters and task vectors of one base model (Selective Task "
        "Arithmetic and baselines), and forget tasks.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: progress messages; -vv: debug")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    merge = commands.add_parser(
        "merge",
        help="merge the models of a YAML recipe",
        description="Merge the fine-tuned models / adapters / task vectors of a YAML recipe into one model.",
        epilog=lambda: _MERGE_EPILOG.format(methods=methods_text()),
        formatter_class=_HelpFormatter,
    )
    _add_recipe_options(merge, "merge")
    merge.set_defaults(func=_merge)

    forget = commands.add_parser(
        "forget",
        help="forget a task, as a YAML recipe says",
        description="Remove a task from a model: theta' = theta - scaling * m_f * tau_f.",
        epilog=_FORGET_EPILOG,
        formatter_class=_HelpFormatter,
    )
    _add_recipe_options(forget, "forget")
    forget.set_defaults(func=_forget)

    compress = commands.add_parser(
        "compress",
        help="prune a multi-task model for the tasks kept, as a YAML recipe says",
        description="Remove the attention heads, FFN neurons and layers the kept tasks need least (group Taylor "
        "importance); writes a smaller checkpoint that loads with stock transformers (hf_sta.compression.recipe).",
        formatter_class=_HelpFormatter,
    )
    _add_recipe_options(compress, "compress")
    compress.set_defaults(func=_compress)

    _add_importance_parser(commands)
    _add_finetune_parser(commands)
    _add_hub_and_info_parsers(commands)
    return parser


def _add_importance_parser(commands: Any) -> None:
    """``hf-sta importance``: one task's importance on its calibration data, saved for a later merge."""
    importance = commands.add_parser(
        "importance",
        help="compute one task's importance and save it",
        description="Score every parameter of one task by how much its loss depends on it, on its own calibration "
        "data, and save the scores (safetensors + metadata) for a later merge (importance.<task>.path).",
        formatter_class=_HelpFormatter,
    )
    importance.add_argument("--base", required=True, default=argparse.SUPPRESS, help="base model (folder or repo id)")
    importance.add_argument("--model", default=None, metavar="TASK=PATH", help="the task's fine-tuned model")
    importance.add_argument("--adapter", default=None, metavar="TASK=PATH", help="or the task's PEFT LoRA adapter")
    importance.add_argument(
        "--data",
        default=None,
        help="calibration data: a .json/.jsonl/.csv/.parquet file or a datasets name (not needed for magnitude)",
    )
    importance.add_argument("--split", default="train", help="split or slice of the data, e.g. 'train[:512]'")
    importance.add_argument("--subset", default=None, help="dataset configuration name")
    importance.add_argument("--text-column", default="text", help="column of raw text")
    importance.add_argument("--label-column", default="label", help="column of class labels (classifiers)")
    importance.add_argument("--metric", default="taylor", choices=list(IMPORTANCE_METRICS), help="importance metric")
    importance.add_argument("--num-samples", type=_positive_int, default=256, help="calibration samples used")
    importance.add_argument(
        "--micro-batch-size", type=_positive_int, default=8, help="samples per gradient (1: per-sample scores)"
    )
    importance.add_argument("--max-length", type=_positive_int, default=512, help="truncation length")
    importance.add_argument("--torch-dtype", default=None, help="dtype of the backward pass (None: the model's)")
    importance.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")
    importance.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    importance.add_argument(
        "--output", required=True, default=argparse.SUPPRESS, help="file to write (importance.safetensors)"
    )
    importance.set_defaults(func=_importance)


def _add_hub_and_info_parsers(commands: Any) -> None:
    """``hf-sta push`` (upload a saved folder), ``inspect`` (describe one) and ``methods`` (list the merge methods)."""
    push = commands.add_parser(
        "push",
        help="upload a saved folder to the Hub",
        description="Upload an already saved folder (a merge, a forgetting, an adapter) to a Hub model repo as one "
        "commit; the repo is created when missing.",
        formatter_class=_HelpFormatter,
    )
    push.add_argument("dir", type=Path, help="the folder to upload")
    push.add_argument("repo_id", help="the Hub repo (user/name or org/name)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--revision", default=None, help="branch to commit to (created when missing; default main)")
    push.add_argument("--commit-message", default=None, help="commit title (default: 'Upload DIR with hf_sta')")
    push.set_defaults(func=_push)

    inspect = commands.add_parser(
        "inspect",
        help="describe a saved output folder",
        description="Print a folder's recipe, per-layer tensor statistics (tensors, parameters, dtype), its task "
        "heads and any importance files.",
        formatter_class=_HelpFormatter,
    )
    inspect.add_argument("dir", type=Path, help="an hf_sta output folder (or any safetensors checkpoint folder)")
    inspect.set_defaults(func=_inspect)

    methods = commands.add_parser(
        "methods",
        help="list the merge methods and their parameters",
        description="List the registered merge methods with their papers, parameters and defaults.",
        formatter_class=_HelpFormatter,
    )
    methods.set_defaults(func=_methods)


class _Formatter(logging.Formatter):
    """``hf-sta: warning: ...`` for warnings, ``hf-sta: ...`` for progress messages (``-v``)."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        text = f"{PROG}: {level}{record.getMessage()}"
        return text + "\n" + self.formatException(record.exc_info) if record.exc_info else text


_QUIET_ENVIRONMENT = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "critical",  # a failed read is re-raised by hf_sta, naming the file
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Without ``-v``, stderr holds hf_sta's own lines only: the libraries' progress bars (weights loading, dataset
    generation, uploads) and info/warning logs are off for the command, through their environment variables (read
    when they are first imported, which the CLI does later; a user's own setting wins) and, for libraries already
    imported (``main`` called in-process), their runtime switches. Everything is restored afterwards."""
    saved_environment = {name: os.environ.get(name) for name in _QUIET_ENVIRONMENT}
    for name, value in _QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    restore: list[Callable[[], None]] = []
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import utils as hub_utils

        if not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            restore.append(hub_utils.enable_progress_bars)
    for name in ("transformers", "datasets"):
        if name in sys.modules:
            library_logging = importlib.import_module(f"{name}.utils.logging")
            verbosity, bars = library_logging.get_verbosity(), library_logging.is_progress_bar_enabled()
            library_logging.set_verbosity(logging.CRITICAL if name == "datasets" else logging.ERROR)
            library_logging.disable_progress_bar()
            restore.append(functools.partial(library_logging.set_verbosity, verbosity))
            if bars:
                restore.append(library_logging.enable_progress_bar)
    try:
        yield
    finally:
        for undo in reversed(restore):
            undo()
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Exception types whose message says it all; any other type is named in front of its message.
_SELF_EXPLAINED = (HfStaError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, ValueError)


def _one_line(error: BaseException) -> str:
    """``error`` as one line: its message (with the file for OS errors, the Hub's explanation for Hub errors, the
    notes added on the way up), the exception type in front when the message alone would not say what failed."""
    if isinstance(error, OSError) and error.strerror and not isinstance(error, _SELF_EXPLAINED):
        where = " -> ".join(f"'{name}'" for name in (error.filename, error.filename2) if name)
        message = f"{error.strerror}" + (f": {where}" if where else "")
    else:
        message = str(error)
    if isinstance(error, MemoryError):
        message = "out of memory" + (f": {message}" if message else "")
    elif not isinstance(error, _SELF_EXPLAINED):
        message = f"{type(error).__name__}: {message}" if message else type(error).__name__
    if isinstance(error, ConnectionError) or type(error).__name__ in ("ConnectError", "ConnectTimeout"):
        from huggingface_hub import constants

        message += f" (while contacting the Hub at {constants.ENDPOINT}; set HF_ENDPOINT / HF_HUB_OFFLINE as needed)"
    notes = [str(note) for note in getattr(error, "__notes__", [])]
    message = " ".join(" ".join([message, *notes]).split())
    return message.replace("pass overwrite=True", "pass --overwrite")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-sta`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Every failure (a bad recipe or argument, a bad input file, a full disk, an unreachable Hub, out of memory) is one
    ``hf-sta: error: ...`` line on stderr and exit status 2; ``-vv`` adds the traceback. Ctrl-C and SIGTERM print
    ``hf-sta: interrupted`` and exit with 130 (a write in progress is removed, nothing half-written is left).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error (already printed as one line)
        return int(done.code or 0)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    package_logger = logging.getLogger("hf_sta")
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        with _quiet_libraries() if args.verbose == 0 else contextlib.nullcontext():
            return func(args)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as err:  # noqa: BLE001 - every failure ends as one line; -vv shows the traceback
        logger.debug("Traceback:", exc_info=True)
        sys.stderr.write(f"{PROG}: error: {_one_line(err)}\n")
        return EXIT_USAGE
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
