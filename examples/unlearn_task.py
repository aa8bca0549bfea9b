"""Unlearn one task from a merged multi-task MiniLM model with a trained, removable adapter (FUSED-style), next to
STA forgetting whose scaling lands the task at chance.

1. Merge MiniLM fine-tunes of three offline tasks with STA (cached by ``benchmarks.finetune``).
2. STA forgetting with ``tune_forgetting(rule="closest_to_chance", scalings="bisect")``: the scaling (found by
   bisection on validation) whose forgotten-task accuracy is nearest chance while the others keep >= 98%.
3. ``merger.unlearn``: score each layer's sensitivity to the forgotten task against the others, put LoRA adapters
   (r=16, alpha=32) on the critical layers only, and train them with the merged weights frozen: the other tasks'
   training rows through their own heads, plus KL to the label prior on the forgotten task's inputs; stop once its
   validation accuracy is within 2 points of chance (``eval_fn = |accuracy - chance|``, ``goal=0.02``). The adapter
   folder switches the forgetting on and off.

    python -m examples.unlearn_task                      # real MiniLM, unlearns "news"
    python -m examples.unlearn_task --tiny               # tiny BERT: seconds
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.finetune import torch_threads
from benchmarks.tasks import TASKS
from benchmarks.unlearning_scoring import head_loss, head_predict, majority_rate
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
    """Run the example; returns ``{"forget", "chance", "curve", "adapter_dir", "record", "scores": {row: {task:
    Scores}}}`` (test scores)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=TASKS)
    parser.add_argument("--forget", default=None, help="the task to unlearn (default: the first)")
    parser.add_argument("--calibration-samples", type=int, default=128, help="STA importance samples per task")
    parser.add_argument("--max-steps", type=int, default=150, help="adapter training steps at most")
    add_common_arguments(parser, name="unlearn_task")
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
        base, models, data, heads, tokenizer = bench.base, bench.models, bench.data, bench.heads, bench.tokenizer
        scores = bench.scores

        def accuracy(body) -> float:  # the forgotten task on validation
            return scores(body, "validation", [forget])[forget].accuracy

        merger = STAMerger.from_pretrained(base, finetuned=models)
        for task in args.tasks:
            merger.compute_importance(task, data[task]["train"], num_samples=args.calibration_samples,
                                      max_length=settings.max_length, show_progress=False)  # fmt: skip
        merged_dir = merger.merge(method="sta", output_dir=out / "merged", overwrite=True)
        chance = majority_rate(data[forget]["validation"]["label"])

        curve = merger.tune_forgetting(
            forget, accuracy, lambda body: sum(s.accuracy for s in scores(body, "validation", others).values()),
            rule="closest_to_chance", chance=chance, scalings="bisect", target=merged_dir,
        )  # fmt: skip
        head_pairs = {t: (h["classifier.weight"], h["classifier.bias"]) for t, h in heads.items()}
        adapter_dir = merger.unlearn(
            BertModel.from_pretrained(merged_dir), {forget: data[forget]["train"]},
            {t: data[t]["train"] for t in others},
            loss_fn={t: head_loss(h) for t, h in head_pairs.items()},
            predict_fn={t: head_predict(h) for t, h in head_pairs.items()},
            forget_loss="prior", eval_fn=lambda body: abs(accuracy(body) - chance), goal=0.02,
            max_steps=args.max_steps,
            tokenizer=tokenizer, max_length=settings.max_length, show_progress=False,
            output_dir=out / f"unlearn-{forget}", overwrite=True,
        )  # fmt: skip
        switchable = PeftModel.from_pretrained(BertModel.from_pretrained(merged_dir), adapter_dir)
        rows = {
            "STA merge": scores(BertModel.from_pretrained(merged_dir)),
            f"STA forgetting (x{curve.best_scaling:.3g}, closest to chance)": scores(
                merger.forget(forget, scaling=curve.best_scaling, target=merged_dir)
            ),
            "unlearning adapter, enabled": scores(switchable),
        }
        with switchable.disable_adapter():
            rows["unlearning adapter, disabled"] = scores(switchable)

    record = merger.last_unlearning
    print_table(
        f"Test accuracy (cross-entropy) with each task's own head; '{forget}' unlearned (validation chance "
        f"{chance:.3f}).\nAdapter: LoRA r=16 on {', '.join(record['layers'])}; {record['trainable_parameters']:,} "
        f"trainable parameters; {record['steps']} steps (goal reached: {record['goal_reached']}).",
        {name: {t: f"{s.accuracy:.3f} ({s.loss:.3f})" for t, s in row.items()} for name, row in rows.items()},
    )
    return {"forget": forget, "chance": chance, "curve": curve, "adapter_dir": adapter_dir, "record": record,
            "scores": rows}  # fmt: skip


if __name__ == "__main__":
    main()
