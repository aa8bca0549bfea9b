"""Forget one task from a merged multi-task MiniLM model, permanently or as a LoRA adapter you can switch off.

1. Merge MiniLM fine-tunes of three offline tasks with STA (cached by ``benchmarks.finetune``).
2. Choose the forgetting scaling on the validation split as task-vector negation does: the largest drop of the
   forgotten task's accuracy while the other tasks keep >= 95% of theirs (``STAMerger.tune_forgetting``).
3. Forget: ``theta' = theta - scaling * m_f * tau_f`` (only the task's important entries), written as a checkpoint,
   and the same edit as a PEFT LoRA adapter over the merged model: enabled the task is forgotten, disabled the merged
   model is back exactly.

    python -m examples.forget_task                            # real MiniLM, forgets "news"
    python -m examples.forget_task --tiny --scaling 1.0       # tiny BERT, fixed scaling: seconds
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
)
from hf_sta import STAMerger

DEFAULT_TASKS = ("news", "movie_sentiment", "tweet_sentiment")
SCALINGS = (0.5, 1.0, 1.5, 2.0, 3.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns ``{"forget", "scaling", "curve", "merged_dir", "forgotten_dir", "adapter_dir",
    "scores": {row: {task: Scores}}}`` (test scores)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=TASKS)
    parser.add_argument("--forget", default=None, help="the task to forget (default: the first)")
    parser.add_argument("--calibration-samples", type=int, default=128, help="STA importance samples per task")
    parser.add_argument("--scaling", type=float, default=None, help="fixed forgetting scaling (default: tuned)")
    parser.add_argument("--energy", type=float, default=0.999, help="adapter: singular-value energy kept per module")
    add_common_arguments(parser, name="forget_task")
    args = parser.parse_args(argv)
    settings = Settings.from_args(args)
    forget = args.forget or args.tasks[0]
    others = [t for t in args.tasks if t != forget]
    from peft import PeftModel
    from transformers import BertModel

    with quiet(), torch_threads(args.num_threads):
        out = args.output_dir
        out.mkdir(parents=True, exist_ok=True)
        bench = TaskModels.build(args.tasks, settings, out / "work")
        base, models, data = bench.base, bench.models, bench.data
        scores = bench.scores

        merger = STAMerger.from_pretrained(base, finetuned=models)
        for task in args.tasks:
            merger.compute_importance(
                task,
                data[task]["train"],
                num_samples=args.calibration_samples,
                max_length=settings.max_length,
                show_progress=False,
            )
        merged_dir = merger.merge(method="sta", output_dir=out / "merged", overwrite=True)

        curve = None
        scaling = args.scaling
        if scaling is None:
            curve = merger.tune_forgetting(
                forget,
                eval_fn=lambda body: scores(body, "validation", [forget])[forget].accuracy,
                control_fn=lambda body: (
                    sum(s.accuracy for s in scores(body, "validation", others).values()) / len(others)
                ),
                scalings=SCALINGS,
                target=merged_dir,
            )
            if curve.best_scaling is None:
                raise SystemExit(f"No scaling in {SCALINGS} keeps the other tasks at >= 95%: {curve.points}")
            scaling = curve.best_scaling
        forgotten_dir = merger.forget(
            forget, scaling=scaling, target=merged_dir, output_dir=out / f"forgot-{forget}", overwrite=True
        )

        # The reversible version: the same edit as a LoRA adapter over the merged model, loaded as the base with the
        # forgotten task's vector and importance as files (an in-memory task vector would take its deltas from the
        # tensors of whichever base the merger holds).
        vector = merger.task_vectors[forget].save(out / "shipped" / f"{forget}.safetensors")
        importance = merger.save_importance(forget, out / "shipped" / f"{forget}.importance.safetensors")
        over_merged = STAMerger.from_task_vectors(merged_dir, {forget: vector}, importance={forget: importance})
        adapter_dir = over_merged.forget(
            forget,
            scaling=scaling,
            as_adapter=True,
            energy=args.energy,
            output_dir=out / f"forget-{forget}-adapter",
            overwrite=True,
        )
        switchable = PeftModel.from_pretrained(BertModel.from_pretrained(merged_dir), adapter_dir)
        rows = {
            "STA merge": scores(BertModel.from_pretrained(merged_dir)),
            f"forgotten '{forget}' (x{scaling:g})": scores(BertModel.from_pretrained(forgotten_dir)),
            f"forgotten as a LoRA adapter (x{scaling:g}), enabled": scores(switchable),
        }
        with switchable.disable_adapter():
            rows[f"forgotten as a LoRA adapter (x{scaling:g}), disabled"] = scores(switchable)

    chosen = f"chosen on validation among {SCALINGS}" if curve else "fixed"
    report = over_merged.last_adapter_report.summary()
    print_table(
        f"Test accuracy (cross-entropy) with each task's own head; forgetting scaling {scaling:g} ({chosen}).\n"
        f"Adapter: {report['modules']} LoRA modules of rank {report['rank_min']}-{report['rank_max']} (mean relative "
        f"error {report['relative_error_mean']:.1e}); {report['skipped']} tensors (biases, LayerNorm) not LoRA-able.",
        {name: {t: f"{s.accuracy:.3f} ({s.loss:.3f})" for t, s in row.items()} for name, row in rows.items()},
    )
    return {
        "forget": forget,
        "scaling": scaling,
        "curve": curve,
        "merged_dir": merged_dir,
        "forgotten_dir": forgotten_dir,
        "adapter_dir": adapter_dir,
        "scores": rows,
    }


if __name__ == "__main__":
    main()
