"""Merge a model with other fine-tunes the moment ``transformers.Trainer`` finishes training it (STAMergeCallback).

1. Two teams already have MiniLM fine-tunes (``benchmarks.finetune``, cached) and shipped their STA importance
   (``STAMerger.compute_importance`` + ``save_importance``: scores, no data).
2. We fine-tune MiniLM on a third task with a plain ``Trainer``; ``STAMergeCallback`` saves the trained model at
   ``on_train_end``, computes its importance on a slice of the train data (the Trainer's own collator), merges it
   with the others and writes the merged folder (heads, recipe, model card, the trained task's importance).

    python -m examples.trainer_callback                   # real MiniLM: trains tweet_sentiment, merges 3 tasks
    python -m examples.trainer_callback --tiny            # tiny BERT: seconds
    python -m examples.trainer_callback --sam-rho 0.05    # the same with SAMTrainer: SAM fine-tune -> merge
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.finetune import WARMUP_RATIO, WEIGHT_DECAY, torch_threads
from benchmarks.tasks import TASKS
from examples._common import (
    Settings,
    add_common_arguments,
    finetuned_models,
    load_splits,
    load_tokenizer,
    new_classifier,
    print_table,
    quiet,
    read_head,
    score_body,
)
from hf_sta import MergeConfig, STAMerger
from hf_sta.callback import STAMergeCallback
from hf_sta.training import SAMTrainer

MERGES = {
    "sta": MergeConfig(method="sta"),
    "task_arithmetic": MergeConfig(method="task_arithmetic", scaling=0.5),
    "ties": MergeConfig(method="ties", params={"density": 0.2}),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns ``{"callback", "base", "models", "trained_dir", "importance_files",
    "merge_config", "scores": {row: {task: Scores}}}``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="tweet_sentiment", choices=TASKS, help="the task the Trainer trains")
    parser.add_argument("--others", nargs="+", default=["news", "movie_sentiment"], choices=TASKS)
    parser.add_argument("--method", choices=sorted(MERGES), default="sta")
    parser.add_argument("--calibration-samples", type=int, default=128, help="STA importance samples per task")
    parser.add_argument(
        "--sam-rho", type=float, default=None, help="train with hf_sta.training.SAMTrainer (SAM radius) instead"
    )
    parser.add_argument("--sam-adaptive", action="store_true", help="with --sam-rho: ASAM (e.g. --sam-rho 0.5)")
    add_common_arguments(parser, name="trainer_callback")
    args = parser.parse_args(argv)
    settings = Settings.from_args(args)
    from transformers import BertModel, DataCollatorWithPadding, Trainer, TrainingArguments

    tasks = [*args.others, args.task]
    with quiet(), torch_threads(args.num_threads):
        out = args.output_dir
        out.mkdir(parents=True, exist_ok=True)
        base, models = finetuned_models(args.others, settings, out / "work")
        data = {task: load_splits(task, settings) for task in tasks}
        tokenizer = load_tokenizer(base)

        # What the other teams ship with their models: importance scores computed where their data lives.
        importance_files = {}
        if MERGES[args.method].method == "sta":
            for task, folder in models.items():
                site = STAMerger.from_pretrained(base, {task: folder})
                site.compute_importance(
                    task,
                    data[task]["train"],
                    num_samples=args.calibration_samples,
                    max_length=settings.max_length,
                    show_progress=False,
                )
                importance_files[task] = site.save_importance(task, out / "importance" / f"{task}.safetensors")

        callback = STAMergeCallback(
            base,
            task_name=args.task,
            models=models,
            merge_config=MERGES[args.method],
            importance_files=importance_files,
            importance_samples=args.calibration_samples if importance_files else None,
            output_dir=out / "merged",
            overwrite=True,
            trained_model_dir=out / "trained",
        )
        train = (
            data[args.task]["train"]
            .map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=settings.max_length), batched=True)
            .remove_columns(["text"])
        )
        # SAMTrainer is a drop-in Trainer: the same arguments plus sam_rho / sam_adaptive.
        sharpness = {} if args.sam_rho is None else {"sam_rho": args.sam_rho, "sam_adaptive": args.sam_adaptive}
        trainer = (Trainer if args.sam_rho is None else SAMTrainer)(
            model=new_classifier(base, args.task, settings.seed),
            args=TrainingArguments(
                output_dir=str(out / "trainer"),
                num_train_epochs=settings.epochs,
                per_device_train_batch_size=settings.batch_size,
                learning_rate=settings.lr,
                weight_decay=WEIGHT_DECAY,
                warmup_steps=WARMUP_RATIO,  # < 1: a fraction of the steps
                seed=settings.seed,
                save_strategy="no",
                logging_strategy="no",
                report_to=[],
                disable_tqdm=True,
                use_cpu=True,
            ),
            train_dataset=train,
            data_collator=DataCollatorWithPadding(tokenizer),
            processing_class=tokenizer,
            callbacks=[callback],
            **sharpness,
        )
        trainer.train()  # ... and at on_train_end the callback merges

        merged_dir = callback.output_path
        individual = {**models, args.task: out / "trained"}
        merged_body = BertModel.from_pretrained(merged_dir)
        scores = {"individual fine-tunes": {}, f"merged by the callback ({args.method})": {}}
        for task in tasks:
            test = data[task]["test"]
            body = BertModel.from_pretrained(individual[task])
            own = score_body(body, read_head(individual[task]), test, tokenizer, settings.max_length)
            head = read_head(merged_dir / "heads" / f"{task}.safetensors")
            scores["individual fine-tunes"][task] = own
            scores[f"merged by the callback ({args.method})"][task] = score_body(
                merged_body, head, test, tokenizer, settings.max_length
            )

    print_table(
        f"Test accuracy with each task's own head; '{args.task}' trained by the Trainer "
        f"({settings.train_size} examples), merged at on_train_end into {merged_dir}",
        {name: {t: s.accuracy for t, s in row.items()} for name, row in scores.items()},
    )
    return {
        "callback": callback,
        "base": base,
        "models": models,
        "trained_dir": out / "trained",
        "importance_files": importance_files,
        "merge_config": MERGES[args.method],
        "trainer": trainer,
        "scores": scores,
    }


if __name__ == "__main__":
    main()
