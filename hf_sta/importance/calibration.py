"""The calibration loop: gradients of a task's own loss on its own data, accumulated per parameter.

Runs unchanged on CPU, one GPU, or several processes under ``accelerate launch``. The model is *not* wrapped in DDP:
each process takes the gradient of its own micro-batches (gradient averaging across processes would turn the mean
of ``|g_j|`` into ``|mean g_j|``). Every parameter gets a post-accumulate-grad hook that folds its gradient into an fp32
accumulator (``+= |g|`` or ``+= g^2``) and frees the gradient at once, so the accumulation overlaps the backward pass
and no full set of gradients is ever held. Accumulators are summed across processes once, at the end.

A model too large for one device is sharded across the processes with FSDP2 (``fully_shard``, or accelerate's
``FullyShardedDataParallelPlugin(fsdp_version=2)`` on GPUs): then every process takes the same micro-batches, FSDP's
reduce-scatter leaves each process its shard of that micro-batch's gradient, each process folds its shard, and the
shards are gathered once at the end: the statistics equal one process's on the whole model.
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


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded across processes (FSDP2: ``torch.distributed.fsdp.fully_shard``,
    also what ``accelerate``'s FSDP plugin applies with ``fsdp_version=2``); FSDP1's flat parameters are refused."""
    from torch.distributed.tensor import DTensor

    if any(type(module).__name__ == "FullyShardedDataParallel" for module in model.modules()):
        raise ValueError("FSDP1 (FullyShardedDataParallel) models are not supported: shard with FSDP2 (fully_shard, "
                         "or accelerate's FullyShardedDataParallelPlugin(fsdp_version=2)).")  # fmt: skip
    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def _full(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a local shard ``tensor`` laid out like the sharded parameter ``like`` (a collective: every
    process calls it in the same order)."""
    from torch.distributed.tensor import DTensor

    sharded = DTensor.from_local(tensor, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return sharded.full_tensor()


class _GradientFolder:
    """Folds each micro-batch's gradient into per-parameter fp32 accumulators (one per distinct Parameter: tied
    weights share one). Unsharded: in a post-accumulate-grad hook, as the backward pass goes. Sharded (FSDP2): after
    the backward pass, from each process's shard of the reduce-scattered gradient (all processes take the same
    micro-batch, so the averaged gradient is that micro-batch's own); the step's total is summed across processes so
    that every process stops at the same non-finite step."""

    def __init__(self, targets: dict[int, nn.Parameter], statistic: str, device: torch.device, sharded: bool) -> None:
        self.targets, self.statistic, self.sharded = targets, statistic, sharded
        self.step_total = torch.zeros((), device=device, dtype=torch.float32)
        local = {pid: p.to_local() if sharded else p for pid, p in targets.items()}
        self.accumulators = {pid: torch.zeros(t.shape, dtype=torch.float32, device=device) for pid, t in local.items()}
        self.handles = [] if sharded else [p.register_post_accumulate_grad_hook(self._hook(pid)) for pid, p in targets.items()]  # fmt: skip

    def _hook(self, pid: int):
        def hook(param: nn.Parameter) -> None:
            _fold(self.accumulators[pid], param.grad, self.statistic, self.step_total)
            param.grad = None

        return hook

    def backward(self, loss: torch.Tensor) -> bool:
        """Back-propagate ``loss`` and fold its gradients; whether they were all finite."""
        self.step_total.zero_()
        loss.backward()
        if self.sharded:
            for pid, param in self.targets.items():
                if param.grad is not None:
                    _fold(self.accumulators[pid], param.grad.to_local(), self.statistic, self.step_total)
                    param.grad = None
            torch.distributed.all_reduce(self.step_total)
        return bool(torch.isfinite(self.step_total))

    def means(self, count: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, torch.Tensor]:
        """``{parameter id: sum / count}`` of the whole parameters, on the CPU (``reduce`` sums data-parallel
        processes' accumulators)."""
        for handle in self.handles:
            handle.remove()
        if self.sharded:
            return {pid: _full(acc, self.targets[pid]).div_(count).cpu() for pid, acc in self.accumulators.items()}
        return {pid: reduce(acc).div_(count).cpu() for pid, acc in self.accumulators.items()}


def _targets(model: nn.Module, parameter_names: Mapping[str, str] | None) -> tuple[dict, dict]:
    """``({id: Parameter}, {id: [output names]})`` of the scored parameters (tied ones once, with every name)."""
    state = model.state_dict(keep_vars=True)
    if parameter_names is None:
        parameter_names = {k: k for k, v in state.items() if isinstance(v, nn.Parameter)}
    missing = [k for k in parameter_names if k not in state]
    if missing:
        raise KeyError(f"Parameters not found in the model: {', '.join(missing[:5])}")
    targets: dict[int, nn.Parameter] = {}
    names_of: dict[int, list[str]] = {}
    for key, name in parameter_names.items():
        param = state[key]
        if not isinstance(param, nn.Parameter):
            raise ValueError(f"'{key}' is a buffer, not a trainable parameter; it cannot be scored with gradients.")
        targets[id(param)] = param
        names_of.setdefault(id(param), []).append(name)
    return targets, names_of


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
        model: the fine-tuned model, in the dtype and on the device you want the backward pass to run in; or that
            model sharded across the processes with FSDP2 (:func:`is_sharded`), for a model too large for one device.
        batches: an iterable of micro-batches (each one gradient ``g_j`` of its mean loss). Under several processes,
            pass a dataloader prepared by ``accelerator`` so each process sees its own share (data parallel); a
            sharded model needs every process to see the same batches instead (``hf_sta.measure`` does both).
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
        ``N`` the number of samples, both summed over all processes (sharded: the processes' common count).
    """
    if statistic not in ("abs", "square"):
        raise ValueError(f"statistic must be 'abs' or 'square', got {statistic!r}")
    check_num_samples(num_samples)
    from accelerate.utils import send_to_device
    from tqdm.auto import tqdm

    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    device, loss_fn, sharded = accelerator.device, loss_fn or default_loss, is_sharded(model)
    targets, names_of = _targets(model, parameter_names)
    model.to(device)
    model.eval()  # no dropout: scores are a deterministic function of the data
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    requires_grad_before = {id(p): p.requires_grad for p in model.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in targets)
        param.grad = None
    folder = _GradientFolder(targets, statistic, device, sharded)
    show = show_progress and accelerator.is_main_process
    progress = tqdm(total=num_samples, desc=description, unit="sample", disable=None if show else True)
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
            if not folder.backward(loss):
                raise FloatingPointError(f"Non-finite gradients at calibration batch {index}; stopping.")
            micro_batches, samples = micro_batches + 1, samples + batch_size(batch)
            progress.update(batch_size(batch))
    finally:
        progress.close()
        for param in model.parameters():
            param.requires_grad_(requires_grad_before[id(param)])
            param.grad = None

    data_parallel = accelerator.num_processes > 1 and not sharded
    totals = torch.tensor([micro_batches, samples], device=device, dtype=torch.float64)
    totals = accelerator.reduce(totals, reduction="sum") if data_parallel else totals
    count, total_samples = int(totals[0].item()), int(totals[1].item())
    if count == 0:
        raise ValueError("The calibration data is empty: no batch was processed.")
    means = folder.means(count, lambda t: accelerator.reduce(t, reduction="sum") if data_parallel else t)
    return {name: means[pid] for pid, names in names_of.items() for name in names}, count, total_samples
