"""``wudi``: WUDI-Merging, data-free interference minimisation guided by the task vectors (Cheng et al., ICML 2025).

The paper's observation: the rows of a linear layer's task vector ``tau_t`` (``[out, in]``) approximately span the
inputs that layer saw while fine-tuning on task ``t``, so they can stand in for those inputs. The interference of a
merged delta on task ``t`` is then measured on the task vector itself, and per 2-D tensor WUDI solves::

    min_delta  L(delta) = sum_t c_t ||(delta - tau_t) tau_t^T||_F^2,     c_t = w_t / ||tau_t||_F^2

(unit weights ``w_t`` are the paper's). ``L`` is a least-squares problem in ``delta``: with
``M = sum_t c_t tau_t^T tau_t`` (``[in, in]``) and ``B = sum_t c_t tau_t tau_t^T tau_t`` (``[out, in]``)::

    grad L = 2 (delta M - B),        minimisers: delta M = B,   i.e.  delta = B M^-1 when M is invertible.

Solvers (``solver``):

- ``"adam"`` (default, the paper's): Adam from ``delta = sum_t tau_t``, learning rate ``1e-5``, ``300`` steps,
  betas ``(0.9, 0.999)``, eps ``1e-8``, no weight decay, on the loss above (a sum over all entries, not a mean):
  ``get_redundant_task_vector`` of the authors' code (github.com/nathanielyvo/WUDI-Merging, ``vit/wudi_main.py``;
  ``--iter`` defaults to 300 in ``vit/args.py``; FusionBench's ``wudi_merging`` runs the same loop; the RoBERTa
  script ``nlp_roberta/lamassu.py`` uses lr ``2e-5``, and the early ``vit/coef.py`` divides by ``||tau_t||``
  unsquared). Optimising rather than solving sidesteps ``M``, which is singular when ``T out < in`` and often
  ill-conditioned. The gradient is computed as
  ``2 (delta M - B)`` from ``M`` and ``B``, built once: one ``[out, in] x [in, in]`` product per step instead of the
  code's ``2 T`` products and autograd (the same gradient, up to rounding). For ``T = 1`` it is exactly 0 at the
  start, ``delta = tau_1``, which is the minimiser. Adam moves each entry by about ``learning_rate`` per step, so
  ``learning_rate * steps`` must match the scale of the task vectors (``1e-5 * 300`` suits fine-tunes whose
  entries are ~1e-3); the result is, like the paper's, not the converged minimiser.
- ``"closed_form"``: ``delta = B (M + lambda I)^-1``, ``lambda = ridge * trace(M) / in`` (a ridge relative to the
  mean eigenvalue of ``M``), solved as the linear system ``(M + lambda I) delta^T = B^T`` (never an explicit
  inverse). ``M`` and ``B`` are accumulated in fp32; the ``[in, in]`` solve runs in fp64, because its condition
  number can reach ``in / ridge``. If the solve fails (a singular system: ``ridge = 0``), the minimum-norm
  least-squares solution (``torch.linalg.lstsq``, ``gelsd``, on the CPU) is taken. As ``ridge -> 0`` this tends to
  the minimum-norm minimiser of ``L``, but fp32 rounding of ``M`` then blows up the directions ``M`` hardly spans
  (seen with ``ridge = 1e-6`` on rank-deficient ``[1024, 1024]`` matrices). The default ``1e-4`` (our choice; the
  paper has no closed form) lost under ``3e-5`` of the decrease of ``L`` from ``sum_t tau_t`` to its minimum on
  low-rank, fast-decaying synthetic task vectors of up to ``[1024, 1024]``.

Weights: ``w_t >= 0`` weights task ``t``'s term of ``L``; a task with ``w_t = 0`` (or ``tau_t = 0``) takes no part
(not even in Adam's start). ``L``'s minimiser does not change when all weights are scaled together: the size of the
merge is the caller's ``scaling`` (the paper uses ``theta = theta_0 + delta``, scaling 1).

Orientation: the last dimension is the input dimension (``nn.Linear``'s ``[out, in]``); every 2-D tensor is merged
as a matrix (a kernel sees no names). ``Conv1D`` weights (``[in, out]``, GPT-2) would have their output dimension
taken for the input: transpose them around the call for the paper's objective. 1x1 convolution kernels
``[out, in, 1, 1]`` are merged as their ``[out, in]`` channel matrices (``pointwise_convolutions_as_matrices``; the
channels are the input dimension). Other tensors that are not 2-D
(``other_tensors``): ``"mean"`` ``sum_t w_t tau_t / T`` (default, as FusionBench's ``wudi_merging``), ``"sum"``
``sum_t w_t tau_t`` (task arithmetic), or ``"zero"`` (the base is kept: the authors' ViT script merges only the
attention and MLP weight matrices and loads nothing else).
"""

from __future__ import annotations

import math

import torch

from .registry import Parameter, check_kernel_inputs, pointwise_convolutions_as_matrices, register_merge_method
from .task_arithmetic import task_arithmetic

SOLVER = Parameter(
    "solver",
    str,
    "adam",
    "'adam': the paper's optimiser (steps, learning_rate) from sum_t tau_t; "
    "'closed_form': delta = B (M + ridge * tr(M) / in * I)^-1, the exact (ridge-regularised) minimiser.",
    choices=("adam", "closed_form"),
)
STEPS = Parameter("steps", int, 300, "Adam iterations per matrix (solver='adam'); 300 is the authors'.", low=0)
LEARNING_RATE = Parameter(
    "learning_rate",
    float,
    1e-5,
    "Adam learning rate (solver='adam'); 1e-5 is the authors' (ViT; 2e-5 in their RoBERTa script).",
    low=0.0,
    low_inclusive=False,
)
RIDGE = Parameter(
    "ridge",
    float,
    1e-4,
    "Ridge added to M relative to its mean eigenvalue, lambda = ridge * tr(M) / in (solver='closed_form').",
    low=0.0,
)
OTHER_TENSORS = Parameter(
    "other_tensors",
    str,
    "mean",
    "How tensors that are not 2-D are merged: 'mean' sum_t w_t tau_t / T (FusionBench), 'sum' sum_t w_t tau_t "
    "(task arithmetic), 'zero' delta = 0 (base kept, as the authors' script).",
    choices=("mean", "sum", "zero"),
)
PARAMETERS = (SOLVER, STEPS, LEARNING_RATE, RIDGE, OTHER_TENSORS)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def interference_statistics(
    task_tensors: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(M, B, start)`` of WUDI's objective for ``[T, out, in]`` task vectors (module docstring).

    ``M = sum_t c_t tau_t^T tau_t`` (``[in, in]``), ``B = sum_t tau_t (c_t tau_t^T tau_t)`` (``[out, in]``) and
    ``start = sum_t tau_t`` (``[out, in]``), over the tasks with ``c_t = w_t / ||tau_t||_F^2 > 0``; ``None`` if
    there is none. ``B`` reuses each ``c_t tau_t^T tau_t`` of ``M``, so that for ``T = 1``, ``start M == B``
    bit for bit.
    """
    num_tasks, rows, cols = task_tensors.shape
    dtype = torch.float64 if task_tensors.dtype == torch.float64 else torch.float32
    gram = torch.zeros(cols, cols, dtype=dtype, device=task_tensors.device)
    target = torch.zeros(rows, cols, dtype=dtype, device=task_tensors.device)
    start = torch.zeros(rows, cols, dtype=dtype, device=task_tensors.device)
    active = False
    for task in range(num_tasks):
        task_vector = task_tensors[task].to(dtype)
        squared_norm = float(task_vector.square().sum())
        if float(weights[task]) <= 0.0 or squared_norm == 0.0:
            continue  # no term: the code's 0 / 0 for a zero task vector
        own_gram = (task_vector.T @ task_vector).mul_(float(weights[task]) / squared_norm)
        gram += own_gram
        target += task_vector @ own_gram
        start += task_vector
        active = True
    return (gram, target, start) if active else None


def adam_minimise(
    gram: torch.Tensor, target: torch.Tensor, start: torch.Tensor, steps: int, learning_rate: float
) -> torch.Tensor:
    """Adam on ``L`` from ``start``, with ``grad L = 2 (delta M - B)``, as ``torch.optim.Adam`` (no weight decay).

    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``delta <- delta - lr / (1 - b1^s) * m / (sqrt(v) / sqrt(1 - b2^s) + eps)`` at step ``s = 1 .. steps``.
    Shapes: ``gram`` ``[in, in]``, ``target`` and ``start`` ``[out, in]``; returns a new ``[out, in]`` tensor.
    """
    beta1, beta2 = ADAM_BETAS
    delta = start.clone()
    first_moment = torch.zeros_like(delta)
    second_moment = torch.zeros_like(delta)
    for step in range(1, steps + 1):
        gradient = (delta @ gram).sub_(target).mul_(2.0)
        first_moment.lerp_(gradient, 1.0 - beta1)
        second_moment.mul_(beta2).addcmul_(gradient, gradient, value=1.0 - beta2)
        denominator = (second_moment.sqrt() / math.sqrt(1.0 - beta2**step)).add_(ADAM_EPS)
        delta.addcdiv_(first_moment, denominator, value=-learning_rate / (1.0 - beta1**step))
    return delta


def ridge_solve(gram: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """``delta = B (M + lambda I)^-1``, ``lambda = ridge * trace(M) / in``, as a linear system in fp64.

    Solves ``(M + lambda I) X = B^T`` (``M`` is symmetric) and returns ``X^T`` (``[out, in]``, fp64); if the system
    is singular, the minimum-norm least-squares ``X`` (``gelsd`` on the CPU).
    """
    system = gram.to(torch.float64, copy=True)
    right_hand_side = target.to(torch.float64).T
    system.diagonal().add_(ridge * float(system.trace()) / system.shape[0])
    solution, info = torch.linalg.solve_ex(system, right_hand_side)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        fallback = torch.linalg.lstsq(system.cpu(), right_hand_side.cpu(), driver="gelsd")
        solution = fallback.solution.to(system.device)
    return solution.T


@register_merge_method(
    "wudi",
    pretty_name="WUDI-Merging",
    paper_title="Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task Vectors",
    paper_url="https://arxiv.org/abs/2503.08099",
    parameters=PARAMETERS,
    description="Per matrix, minimise the interference on each task measured through its own task vector (data-free).",
)
@pointwise_convolutions_as_matrices
def wudi(
    task_tensors: torch.Tensor,
    weights: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    solver: str = "adam",
    steps: int = 300,
    learning_rate: float = 1e-5,
    ridge: float = 1e-4,
    other_tensors: str = "mean",
) -> torch.Tensor:
    """WUDI-Merging: ``argmin_delta sum_t w_t / ||tau_t||^2 ||(delta - tau_t) tau_t^T||_F^2`` per 2-D tensor.

    See the module docstring for the objective, both solvers and their sources.

    Args:
        task_tensors: ``[T, *shape]`` task vectors (fp32; fp64 is computed in fp64, other float dtypes in fp32 and
            cast back). Not modified.
        weights: ``[T]`` non-negative weights of the tasks' terms.
        generator: unused (deterministic method).
        solver: ``"adam"`` (the paper's) or ``"closed_form"``.
        steps: Adam iterations, ``>= 0`` (``0`` returns Adam's start ``sum_t tau_t``).
        learning_rate: Adam's learning rate, ``> 0``.
        ridge: relative ridge of the closed form, ``>= 0``.
        other_tensors: ``"mean"``, ``"sum"`` or ``"zero"``: the delta of tensors that are not 2-D.

    Returns:
        ``[*shape]`` merged delta (a new tensor).

    Raises:
        ValueError: for an invalid parameter or a negative weight.
    """
    weights = check_kernel_inputs(task_tensors, weights)
    values = (solver, steps, learning_rate, ridge, other_tensors)
    solver, steps, learning_rate, ridge, other_tensors = (p.validate(v) for p, v in zip(PARAMETERS, values))
    if bool((weights < 0).any()):
        raise ValueError(f"wudi needs non-negative weights (they weight its objective), got {weights.tolist()}")
    shape = task_tensors.shape[1:]
    if task_tensors.dim() != 3:
        if other_tensors == "zero":
            return torch.zeros(shape, dtype=task_tensors.dtype, device=task_tensors.device)
        merged = task_arithmetic(task_tensors, weights)
        return merged.div_(task_tensors.shape[0]) if other_tensors == "mean" else merged
    statistics = interference_statistics(task_tensors, weights)
    if statistics is None:  # every weight or task vector is zero: nothing to merge
        return torch.zeros(shape, dtype=task_tensors.dtype, device=task_tensors.device)
    gram, target, start = statistics
    if solver == "closed_form":
        merged = ridge_solve(gram, target, ridge)
    else:
        merged = adam_minimise(gram, target, start, steps, learning_rate)
    return merged.to(task_tensors.dtype)
