"""Fine-tune for mergeability: the same tasks fine-tuned with AdamW, SAM and ASAM, then merged, side by side.

Sharpness-aware fine-tuning (Lee, Jung & Baik, ICLR 2025) trains each task towards a flat minimum, which is meant to
make the task vectors interfere less when they are added. This example:

1. fine-tunes all-MiniLM-L6-v2 on each task once per optimizer with :func:`hf_sta.training.finetune` (the loop the
   benchmarks use; the MiniLM runs are cached by ``benchmarks.finetune``, so only the first run trains: SAM and ASAM
   take about twice AdamW's time per step);
2. merges each optimizer's fine-tunes with task arithmetic (scaling chosen on validation among 0.3 / 0.5 / 0.7 / 1)
   and scores the merge with each task's own head on test, next to each fine-tune's own accuracy.

    python -m examples.finetune_sam                                   # 3 tasks x AdamW / SAM / ASAM
    python -m examples.finetune_sam --optimizers adamw sam --sam-rho 0.1
    python -m examples.finetune_sam --tiny                            # tiny BERT: seconds

In your own code the same loop is one call, and ``SAMTrainer`` is the drop-in ``Trainer``:

```python
from hf_sta.training import SAMTrainer, finetune, text_classification_collator

finetune(model, rows, text_classification_collator(tokenizer), optimizer="sam", rho=0.05)
SAMTrainer(model=model, args=training_args, train_dataset=train, sam_rho=0.5, sam_adaptive=True).train()
```
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.finetune import torch_threads
from benchmarks.tasks import TASKS
from examples._common import (
    Settings,
    add_common_arguments,
    finetuned_models,
    load_splits,
    load_tokenizer,
    print_table,
    quiet,
    read_head,
    score_body,
)
from hf_sta import STAMerger

DEFAULT_TASKS = ("news", "movie_sentiment", "tweet_sentiment")
SCALINGS = (0.3, 0.5, 0.7, 1.0)


def _scores(body, heads: dict, data: dict, split: str, tokenizer, settings: Settings) -> dict:
    """``{task: Scores}`` of ``body`` with each task's own head on ``split``."""
    return {task: score_body(body, heads[task], data[task][split], tokenizer, settings.max_length) for task in heads}


def _compare(models: dict, base, data: dict, settings: Settings) -> tuple[float, dict, dict]:
    """One optimizer's fine-tunes: ``(chosen scaling, individual test scores, merged test scores)``."""
    from transformers import BertModel

    tokenizer = load_tokenizer(base)
    heads = {task: read_head(folder) for task, folder in models.items()}
    individual = {
        task: _scores(BertModel.from_pretrained(folder), {task: heads[task]}, data, "test", tokenizer, settings)[task]
        for task, folder in models.items()
    }
    merger = STAMerger.from_pretrained(base, models)

    def validation_accuracy(scaling: float) -> float:
        body = merger.merge(method="task_arithmetic", scaling=scaling)
        rows = _scores(body, heads, data, "validation", tokenizer, settings)
        return sum(r.accuracy for r in rows.values()) / len(rows)

    scaling = max(SCALINGS, key=validation_accuracy)
    merged = _scores(merger.merge(method="task_arithmetic", scaling=scaling), heads, data, "test", tokenizer, settings)
    return scaling, individual, merged


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns ``{"base", "models": {optimizer: {task: folder}}, "scalings": {optimizer: s},
    "scores": {row: {task: Scores}}}``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=TASKS)
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "sam", "asam"], choices=["adamw", "sam", "asam"])
    parser.add_argument("--sam-rho", type=float, default=None, help="SAM's radius (default 0.05)")
    parser.add_argument("--asam-rho", type=float, default=None, help="ASAM's radius (default 0.5)")
    add_common_arguments(parser, name="finetune_sam")
    args = parser.parse_args(argv)
    settings = Settings.from_args(args)
    rho = {"adamw": None, "sam": args.sam_rho, "asam": args.asam_rho}

    with quiet(), torch_threads(args.num_threads):
        args.output_dir.mkdir(parents=True, exist_ok=True)
        data = {task: load_splits(task, settings) for task in args.tasks}
        models, scalings, scores = {}, {}, {}
        for optimizer in args.optimizers:
            base, models[optimizer] = finetuned_models(
                args.tasks, settings, args.output_dir / "work", optimizer=optimizer, rho=rho[optimizer]
            )
            scaling, individual, merged = _compare(models[optimizer], base, data, settings)
            scalings[optimizer] = scaling
            scores[f"{optimizer}: individual"] = individual
            scores[f"{optimizer}: task arithmetic (scaling {scaling:g})"] = merged

    table = {name: {t: s.accuracy for t, s in row.items()} for name, row in scores.items()}
    for row in table.values():
        row["average"] = sum(row.values()) / len(args.tasks)
    print_table(
        f"Test accuracy with each task's own head ({'tiny BERT' if settings.tiny else 'MiniLM'}, "
        f"{settings.train_size} training examples per task; scaling chosen on validation)",
        table,
    )
    return {"base": base, "models": models, "scalings": scalings, "scores": scores}


if __name__ == "__main__":
    main()
