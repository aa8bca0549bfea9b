"""Merge MiniLM models fine-tuned on three offline text tasks into one multi-task model.

1. Fine-tune all-MiniLM-L6-v2 on each task (cached by ``benchmarks.finetune``: trained once, reused after).
2. STA importance (first-order Taylor) of every parameter on each task's own calibration examples.
3. Merge the bodies with task arithmetic, TIES and STA; write the STA merge to ``--output-dir`` (weights, config,
   tokenizer, each task's head under ``heads/``, recipe, model card) and reload it from there.
4. Score every body on each task's test split with that task's own head.

    python -m examples.merge_minilm                       # real MiniLM, 600 examples per task
    python -m examples.merge_minilm --tiny                # tiny BERT, 32 examples per task: seconds
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.finetune import torch_threads
from benchmarks.tasks import TASKS
from examples._common import (
    Settings,
    TaskModels,
    add_common_arguments,
    print_table,
    quiet,
    read_head,
    score_body,
)
from hf_sta import STAMerger

DEFAULT_TASKS = ("news", "movie_sentiment", "tweet_sentiment")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns ``{"base", "models", "output_dir", "scores": {row: {task: Scores}}}``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=TASKS)
    parser.add_argument("--calibration-samples", type=int, default=128, help="STA importance samples per task")
    parser.add_argument("--scaling", type=float, default=0.5, help="task arithmetic lambda")
    parser.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each task vector kept")
    add_common_arguments(parser, name="merge_minilm")
    args = parser.parse_args(argv)
    settings = Settings.from_args(args)
    from transformers import BertModel

    with quiet(), torch_threads(args.num_threads):
        args.output_dir.mkdir(parents=True, exist_ok=True)
        bench = TaskModels.build(args.tasks, settings, args.output_dir / "work")
        base, models, data, heads, tokenizer = bench.base, bench.models, bench.data, bench.heads, bench.tokenizer

        merger = STAMerger.from_pretrained(base, finetuned=models)  # classifier heads are kept per task, not merged
        for task in args.tasks:
            merger.compute_importance(
                task,
                data[task]["train"],
                num_samples=args.calibration_samples,
                max_length=settings.max_length,
                show_progress=False,
            )
        sta_dir = merger.merge(method="sta", output_dir=args.output_dir / "sta", overwrite=True)

        scores = {
            "individual fine-tunes": {
                task: score_body(
                    BertModel.from_pretrained(folder), heads[task], data[task]["test"], tokenizer, settings.max_length
                )
                for task, folder in models.items()
            }
        }
        bodies = {
            "base body": BertModel.from_pretrained(base),
            f"task arithmetic (lambda={args.scaling:g})": merger.merge(method="task_arithmetic", scaling=args.scaling),
            f"TIES (density {args.density:g})": merger.merge(method="ties", density=args.density),
            f"STA (defaults), reloaded from {sta_dir.name}/": BertModel.from_pretrained(sta_dir),
        }
        # A merged folder carries each task's head: score the reloaded STA body with the heads it ships.
        sta_heads = {task: read_head(sta_dir / "heads" / f"{task}.safetensors") for task in args.tasks}
        for name, body in bodies.items():
            row_heads = sta_heads if name.startswith("STA") else heads
            scores[name] = {
                task: score_body(body, row_heads[task], data[task]["test"], tokenizer, settings.max_length)
                for task in args.tasks
            }

    table = {name: {t: s.accuracy for t, s in row.items()} for name, row in scores.items()}
    for row in table.values():
        row["average"] = sum(row.values()) / len(args.tasks)
    print_table(
        f"Test accuracy of each body with each task's own head ({'tiny BERT' if settings.tiny else 'MiniLM'}, "
        f"{settings.train_size} training examples per task)",
        table,
    )
    print(f"STA merge written to {sta_dir}")
    return {"base": base, "models": models, "output_dir": sta_dir, "scores": scores}


if __name__ == "__main__":
    main()
