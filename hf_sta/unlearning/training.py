"""FUSED-style unlearning of one model: score the layers, put LoRA adapters on the critical ones, train them (target
frozen) on ``L_retain + forget_weight * L_forget``, stop when the forget metric reaches the goal.

The adapter is a standard ``peft.PeftModel`` (``get_peft_model``): the target's own weights are never written (PEFT
freezes them and wraps each adapted module), so ``with model.disable_adapter():`` -- or loading the target without the
adapter folder -- gives the target's outputs back bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .config import UnlearnConfig
from .data import Source, cycle
from .layers import as_record, candidate_layers, choose_layers, layer_sensitivity, lora_targets
from .objectives import forget_term, label_prior

logger = logging.getLogger(__name__)

__all__ = ["UnlearningResult", "default_predict", "forget_accuracy", "unlearn_model"]

MAX_GRAD_NORM = 1.0


def default_predict(model: nn.Module, batch: dict) -> torch.Tensor:
    """``model(**inputs).logits`` (``labels`` left out)."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@dataclasses.dataclass
class UnlearningResult:
    """The trained ``PeftModel`` (in eval mode) and what the run measured (JSON-ready)."""

    model: Any
    record: dict[str, Any]


@torch.no_grad()
def forget_accuracy(model: nn.Module, sources: list[Source], device: torch.device) -> float:
    """Mean over forget sources of ``argmax predict_fn(model, batch) == labels`` on their metric batches."""
    from accelerate.utils import send_to_device

    was_training = model.training
    model.eval()
    accuracies = []
    for source in sources:
        correct = total = 0
        for batch in source.metric:
            batch = send_to_device(batch, device)
            predictions = (source.predict_fn or default_predict)(model, batch).argmax(-1)
            correct += int((predictions == batch["labels"]).sum())
            total += int(batch["labels"].numel())
        accuracies.append(correct / max(total, 1))
    model.train(was_training)
    return sum(accuracies) / len(accuracies)


def _priors(sources: list[Source], model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """Label frequencies ``q`` of every forget source (the number of classes read from one prediction)."""
    from accelerate.utils import send_to_device

    priors = {}
    for source in sources:
        labels = torch.cat([batch["labels"].flatten() for batch in source.loader])
        first = send_to_device(next(iter(source.metric)), device)
        with torch.no_grad():
            classes = (source.predict_fn or default_predict)(model, first).shape[-1]
        priors[source.name] = label_prior(labels, classes)
    return priors


def _attach(model: nn.Module, config: UnlearnConfig, forget, retain, accelerator, show_progress: bool):
    """Score the layers (when the choice needs it), choose them and wrap ``model`` in a LoRA ``PeftModel``."""
    from peft import LoraConfig, get_peft_model

    candidates = candidate_layers(model)
    sensitivity = None
    if not isinstance(config.layers, list):
        sensitivity = layer_sensitivity(
            model, [(s.sensitivity, s.loss_fn) for s in forget], [(s.sensitivity, s.loss_fn) for s in retain],
            accelerator=accelerator, show_progress=show_progress,
        )  # fmt: skip
    chosen = choose_layers(config.layers, list(candidates), sensitivity)
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_targets(candidates, chosen), bias="none")  # fmt: skip
    torch.manual_seed(config.seed)  # the A factors' initialisation
    return get_peft_model(model, lora), chosen, sensitivity


def _step_loss(model, step: int, config: UnlearnConfig, forget, retain, streams, priors, device) -> torch.Tensor:
    from accelerate.utils import send_to_device

    source = retain[step % len(retain)]
    loss = source.loss_fn(model, send_to_device(next(streams[("retain", source.name)]), device))
    if config.forget_loss != "none":
        source = forget[step % len(forget)]
        batch = send_to_device(next(streams[("forget", source.name)]), device)
        if config.forget_loss == "ascent":
            term = forget_term("ascent", None, loss=source.loss_fn(model, batch))
        else:
            logits = (source.predict_fn or default_predict)(model, batch)
            term = forget_term(config.forget_loss, logits, prior=priors.get(source.name))
        loss = loss + config.forget_weight * term
    return loss


def _train(model, config, forget, retain, metric: Callable[[], float], accelerator, show_progress: bool) -> dict:
    from tqdm.auto import tqdm

    device = accelerator.device
    priors = _priors(forget, model, device) if config.forget_loss == "prior" else {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    streams = {("retain", s.name): cycle(s.train) for s in retain}
    streams.update({("forget", s.name): cycle(s.train) for s in forget if config.forget_loss != "none"})
    history = [{"step": 0, "forget_metric": metric()}]
    reached = config.goal is not None and history[-1]["forget_metric"] <= config.goal
    progress = tqdm(total=config.max_steps, desc="unlearning", unit="step",
                    disable=not (show_progress and accelerator.is_main_process))  # fmt: skip
    step, losses = 0, []
    model.train()
    while step < config.max_steps and not reached:
        loss = _step_loss(model, step, config, forget, retain, streams, priors, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"unlearn: the loss is {loss.item()} at step {step}; lower learning_rate.")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(float(loss.detach()))
        progress.update(1)
        if step % config.eval_steps == 0 or step == config.max_steps:
            history.append({"step": step, "forget_metric": metric(), "loss": sum(losses) / len(losses)})
            model.train()  # an eval_fn may leave the model in eval mode (no dropout)
            losses = []
            progress.set_postfix(forget_metric=f"{history[-1]['forget_metric']:.3f}")
            reached = config.goal is not None and history[-1]["forget_metric"] <= config.goal
    progress.close()
    return {"steps": step, "goal_reached": reached, "history": history, "model": accelerator.unwrap_model(model)}


def _examples(sources: list[Source], steps: int, batch_size: int) -> int:
    """Examples a run read for training (each batch counts its size; a source read round robin)."""
    return sum(min(len(s.loader.dataset), -(-steps // len(sources)) * batch_size) for s in sources)


def unlearn_model(
    model: nn.Module,
    forget: list[Source],
    retain: list[Source],
    config: UnlearnConfig,
    *,
    eval_fn: Callable[[nn.Module], float] | None = None,
    accelerator: Any = None,
    show_progress: bool = True,
) -> UnlearningResult:
    """Wrap ``model`` (in place, as ``peft.get_peft_model`` does) in the unlearning adapter and train it.

    ``eval_fn(model) -> float``: the forget metric (lower = more forgotten) that ``config.goal`` is compared with;
    default: accuracy on the first ``config.eval_samples`` examples of each forget source, averaged over sources.
    """
    from ..measure import default_accelerator

    if not forget or not retain:
        raise ConfigError("unlearn: both forget and retain data are needed.")
    accelerator = default_accelerator(accelerator)
    started = time.perf_counter()
    model.to(accelerator.device)
    peft_model, chosen, sensitivity = _attach(model, config, forget, retain, accelerator, show_progress)
    selected = time.perf_counter()

    def metric() -> float:
        return (
            float(eval_fn(peft_model))
            if eval_fn is not None
            else forget_accuracy(peft_model, forget, accelerator.device)
        )

    run = _train(peft_model, config, forget, retain, metric, accelerator, show_progress)
    peft_model = run.pop("model").eval()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" not in n)
    sensitivity_examples = sum(
        min(len(s.loader.dataset), config.sensitivity_samples) for s in forget + retain
    ) if sensitivity is not None else 0  # fmt: skip
    record = {
        "method": config.method,
        "config": dataclasses.asdict(config),
        "layers": chosen,
        "sensitivity": as_record(sensitivity),
        "trainable_parameters": trainable,
        "target_parameters": total,
        "examples_touched": {
            "sensitivity": sensitivity_examples,
            "retain_training": _examples(retain, run["steps"], config.batch_size),
            "forget_training": _examples(forget, run["steps"], config.batch_size)
            if config.forget_loss != "none"
            else 0,
        },
        "seconds": {"layer_selection": selected - started, "training": time.perf_counter() - selected},
        **run,
    }
    logger.info("unlearn: layers %s, %d steps, forget metric %.4f -> %.4f", chosen, run["steps"],
                run["history"][0]["forget_metric"], run["history"][-1]["forget_metric"])  # fmt: skip
    return UnlearningResult(peft_model, record)
