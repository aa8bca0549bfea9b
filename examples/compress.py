"""Compress a merged multi-task MiniLM model for a device that needs only some of its tasks.

1. Merge MiniLM fine-tunes of three offline tasks with STA (cached by ``benchmarks.finetune``).
2. ``merger.compress``: keep two of the tasks, score every FFN neuron by the kept tasks' group Taylor importance
   (each task's own head, its own calibration data; normalised per task, then averaged) and keep, per layer, the
   best neurons so that ``--target`` of the non-embedding parameters remain (BERT's heads cannot be removed:
   ``head_dim = hidden_size / num_attention_heads``). Once as it is, once with a short distillation from the
   uncompressed merge (``--recovery-steps``).
3. Both compressed folders reload with stock ``AutoModel``; their heads are under ``heads/<task>.safetensors``; their
   cards show the kept tasks' accuracy before and after (``eval_fn``).

    python -m examples.compress                      # real MiniLM, keeps news + movie_sentiment at 50%
    python -m examples.compress --tiny               # tiny BERT: seconds
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from benchmarks.finetune import torch_threads
from benchmarks.tasks import TASKS
from examples._common import (
    Settings,
    TaskModels,
    add_common_arguments,
    print_table,
    quiet,
)
from hf_sta import STAMerger

DEFAULT_TASKS = ("news", "movie_sentiment", "tweet_sentiment")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns ``{"merged_dir", "compressed_dirs": {row: path}, "records": {row: record},
    "scores": {row: {task: Scores}}}`` (test scores of the kept tasks)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=TASKS)
    parser.add_argument("--keep", nargs="+", default=None, help="tasks kept (default: the first two)")
    parser.add_argument(
        "--target", type=float, default=None, help="fraction of non-embedding parameters kept (default 0.5; 0.75 tiny)"
    )
    parser.add_argument("--calibration-samples", type=int, default=128, help="importance samples per task")
    parser.add_argument("--recovery-steps", type=int, default=None, help="distillation steps (default 200; 8 tiny)")
    add_common_arguments(parser, name="compress")
    args = parser.parse_args(argv)
    settings = Settings.from_args(args)
    keep = args.keep or args.tasks[:2]
    # The tiny BERT's FFN is a third of its non-embedding parameters, MiniLM's two thirds: 0.5 is out of its reach.
    target = args.target if args.target is not None else (0.75 if settings.tiny else 0.5)
    steps = args.recovery_steps if args.recovery_steps is not None else (8 if settings.tiny else 200)
    from transformers import AutoModel

    with quiet(), torch_threads(args.num_threads):
        out = args.output_dir
        out.mkdir(parents=True, exist_ok=True)
        bench = TaskModels.build(args.tasks, settings, out / "work")
        base, models, data = bench.base, bench.models, bench.data

        def scores(body) -> dict:
            return bench.scores(body, "test", keep)

        merger = STAMerger.from_pretrained(base, finetuned=models)
        for task in args.tasks:
            merger.compute_importance(task, data[task]["train"], num_samples=args.calibration_samples,
                                      max_length=settings.max_length, show_progress=False)  # fmt: skip
        merged_dir = merger.merge(method="sta", output_dir=out / "merged", overwrite=True)
        calibration = {task: data[task]["train"] for task in keep}

        def accuracy(body, task: str) -> float:  # measured by compress on both models, for the card
            return bench.scores(body, "test", [task])[task].accuracy

        rows, folders, records = {"STA merge (all tasks)": scores(AutoModel.from_pretrained(merged_dir))}, {}, {}
        for name, recovery in ((f"compressed to {target:g}", 0), (f"+ recovery ({steps} steps)", steps)):
            folders[name] = merger.compress(
                merged_dir, keep_tasks=keep, data=calibration, target=target, recovery_steps=recovery,
                num_samples=args.calibration_samples, max_length=settings.max_length, seed=args.seed, eval_fn=accuracy,
                output_dir=out / f"compressed-r{recovery}", overwrite=True, show_progress=False,
            )  # fmt: skip
            records[name] = json.loads((folders[name] / "hf_sta_compression.json").read_text())
            rows[name] = scores(AutoModel.from_pretrained(folders[name]))  # stock transformers reload

    record = next(iter(records.values()))
    print_table(
        f"Test accuracy (cross-entropy) of the kept tasks with their own heads. Non-embedding parameters "
        f"{record['original']['non_embedding_parameters']:,} -> {record['compressed']['non_embedding_parameters']:,}"
        f" (intermediate_size {record['original']['intermediate_size']} -> "
        f"{record['compressed']['intermediate_size']}).",
        {name: {t: f"{s.accuracy:.3f} ({s.loss:.3f})" for t, s in row.items()} for name, row in rows.items()},
    )
    return {"merged_dir": merged_dir, "compressed_dirs": folders, "records": records, "scores": rows}


if __name__ == "__main__":
    main()
