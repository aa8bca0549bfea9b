"""The calibration loop: gradients of a task's own loss on its own data, accumulated per parameter.

Runs unchanged on CPU, one GPU, or several processes under ``accelerate launch``. The model is *not* wrapped in DDP:
each process takes the gradient of its own micro-batches (gradient averaging across processes would turn the mean
of ``|g_j|`` into ``|mean g_j|``). Every parameter gets a post-accumulate-grad hook that folds its gradient into an fp32
accumulator (``+= |g|`` or ``+= g^2``) and frees the gradient at once, so the accumulation overlaps the backward pass
and no full set of gradients is ever held. Accumulators are summed across processes once, at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .data import batch_size, calibration_failure, check_calibration_batch, check_num_samples

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` (transformers models compute their loss when the batch holds ``labels``)."""
    if not isinstance(batch, Mapping):
        raise ValueError("Batches that are not dicts need a `loss_fn(model, batch)`.")
    outputs = model(**batch)
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise ValueError(
            "The model returned no loss: the calibration batches have no labels. Add labels to the data (for causal "
            "LMs the collator copies input_ids), or pass `loss_fn(model, batch) -> loss`."
        )
    return loss


@torch.no_grad()
def _fold(accumulator: torch.Tensor, grad: torch.Tensor, statistic: str, step_total: torch.Tensor) -> None:
    # In place: the gradient is freed right after this hook, so no temporary is allocated (add_ still accumulates
    # low-precision gradients in fp32).
    folded = grad.abs_() if statistic == "abs" else grad.square_()
    accumulator.add_(folded)
    step_total.add_(folded.sum(dtype=torch.float32))


def accumulate_gradient_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    statistic: str = "abs",
    parameter_names: Mapping[str, str] | None = None,
    loss_fn: LossFn | None = None,
    num_samples: int | None = None,
    accelerator=None,
    gradient_checkpointing: bool = False,
    show_progress: bool = True,
    description: str = "importance",
) -> tuple[dict[str, torch.Tensor], int, int]:
    """Mean over micro-batches of ``|g_j|`` (``statistic="abs"``) or ``g_j^2`` (``"square"``) for each parameter.

    Args:
        model: the fine-tuned model, in the dtype and on the device you want the backward pass to run in.
        batches: an iterable of micro-batches (each one gradient ``g_j`` of its mean loss). Under several processes,
            pass a dataloader prepared by ``accelerator`` so each process sees its own share.
        statistic: ``"abs"`` or ``"square"``.
        parameter_names: ``{state-dict key: output name}``; only these parameters are scored (others get no
            gradient). Tied parameters share one accumulator and each of their names gets it. Default: every
            parameter under its own name.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        num_samples: stop after this many samples on this process (``None``: all batches).
        accelerator: an ``accelerate.Accelerator``; default one built here.
        gradient_checkpointing: trade compute for memory on transformers models.

    Returns:
        ``({name: fp32 CPU tensor of the parameter's shape}, J, N)`` where ``J`` is the number of micro-batches and
        ``N`` the number of samples, both summed over all processes.
    """
    if statistic not in ("abs", "square"):
        raise ValueError(f"statistic must be 'abs' or 'square', got {statistic!r}")
    check_num_samples(num_samples)
    from accelerate.utils import send_to_device

    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    device = accelerator.device
    loss_fn = loss_fn or default_loss

    state = model.state_dict(keep_vars=True)
    if parameter_names is None:
        parameter_names = {k: k for k, v in state.items() if isinstance(v, nn.Parameter)}
    missing = [k for k in parameter_names if k not in state]
    if missing:
        raise KeyError(f"Parameters not found in the model: {', '.join(missing[:5])}")
    # One accumulator per distinct Parameter object (tied weights share one).
    targets: dict[int, nn.Parameter] = {}
    names_of: dict[int, list[str]] = {}
    for key, name in parameter_names.items():
        param = state[key]
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"'{key}' is a buffer, not a trainable parameter; it cannot be scored with gradients.")
        targets[id(param)] = param
        names_of.setdefault(id(param), []).append(name)

    model.to(device)
    model.eval()  # no dropout: scores are a deterministic function of the data
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    requires_grad_before = {id(p): p.requires_grad for p in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in targets)
        param.grad = None

    step_total = torch.zeros((), device=device, dtype=torch.float32)
    accumulators = {pid: torch.zeros(p.shape, dtype=torch.float32, device=device) for pid, p in targets.items()}
    handles = []
    for pid, param in targets.items():

        def hook(p: nn.Parameter, accumulator: torch.Tensor = accumulators[pid]) -> None:
            _fold(accumulator, p.grad, statistic, step_total)
            p.grad = None

        handles.append(param.register_post_accumulate_grad_hook(hook))

    from tqdm.auto import tqdm

    progress = tqdm(
        total=num_samples,
        desc=description,
        unit="sample",
        disable=None if show_progress and accelerator.is_main_process else True,
    )
    micro_batches = samples = 0
    try:
        for index, batch in enumerate(batches):
            if num_samples is not None and samples >= num_samples:
                break
            batch = send_to_device(batch, device)
            check_calibration_batch(model, batch, index)
            try:
                loss = loss_fn(model, batch)
            except (IndexError, RuntimeError, TypeError, ValueError) as err:
                raise calibration_failure(index, batch, err) from err
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)} at batch {index}.")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Calibration loss is {loss.item()} at batch {index}; stopping.")
            step_total.zero_()
            loss.backward()
            if not torch.isfinite(step_total):
                raise FloatingPointError(f"Non-finite gradients at calibration batch {index}; stopping.")
            micro_batches += 1
            size = batch_size(batch)
            samples += size
            progress.update(size)
    finally:
        progress.close()
        for handle in handles:
            handle.remove()
        for param in model.parameters():
            param.requires_grad_(requires_grad_before[id(param)])
            param.grad = None

    totals = torch.tensor([micro_batches, samples], device=device, dtype=torch.float64)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    count, total_samples = int(totals[0].item()), int(totals[1].item())
    if count == 0:
        raise ValueError("The calibration data is empty: no batch was processed.")
    result: dict[str, torch.Tensor] = {}
    for pid, accumulator in accumulators.items():
        if accelerator.num_processes > 1:
            accumulator = accelerator.reduce(accumulator, reduction="sum")
        mean = accumulator.div_(count).cpu()
        for name in names_of[pid]:
            result[name] = mean
    return result, count, total_samples
