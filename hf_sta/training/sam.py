"""Sharpness-aware minimisation (SAM, Foret et al. 2021) and its adaptive variant (ASAM, Kwon et al. 2021).

One SAM step with gradient ``g = grad L(theta)`` over all perturbed parameters (every group, flattened together):

```
T = |theta| + eta      (ASAM, elementwise)   or   T = 1   (SAM)
e = rho * T^2 g / ||T g||_2                                   (the worst-case step of length rho, in T's metric)
theta <- base_optimizer.step(theta, grad L(theta + e))       (the update uses the gradient at the perturbed point)
```

With ``T = 1`` this is ``e = rho g / ||g||``. ``rho`` (and ``adaptive``, ``eta``) may differ per parameter group;
the norm is the one global norm of ``T g`` over every group, as in the paper and the common PyTorch implementation.

Only parameters with ``requires_grad`` and a ``.grad`` are perturbed: frozen parameters (a PEFT model's base
weights) are never touched. Under ``DistributedDataParallel`` the gradients in ``.grad`` are already all-reduced
by ``backward`` (outside ``no_sync``), so every process computes the same ``e``.

:func:`perturb` / :func:`restore` are the two halves as plain functions (used by :class:`SAM` and by
``SAMTrainer``, which keeps the Trainer's own optimizer for the update).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["SAM", "perturb", "restore", "sam_perturbation"]

_NORM_EPSILON = 1e-12


def _perturbed_parameters(group: dict[str, Any]) -> list[torch.Tensor]:
    return [p for p in group["params"] if p.requires_grad and p.grad is not None]


@torch.no_grad()
def sam_perturbation(
    param_groups: Sequence[dict[str, Any]], *, rho: float = 0.05, adaptive: bool = False, eta: float = 0.0
) -> dict[torch.Tensor, torch.Tensor]:
    """``e`` for every parameter with ``requires_grad`` and a gradient: ``rho * T^2 g / ||T g||`` (module docstring).

    Args:
        param_groups: dicts with ``params``; a group's own ``rho`` / ``adaptive`` / ``eta`` keys override the
            arguments.
        rho: radius of the neighbourhood (``||T^-1 e|| = rho``).
        adaptive: ASAM (``T = |theta| + eta``) instead of SAM (``T = 1``).
        eta: ASAM's offset, so that parameters at 0 can still move (the ASAM paper's code uses 0.01; the
            formula of the common PyTorch implementation, and the default here, is 0).

    Returns:
        parameter -> ``e`` (same shape and dtype). Empty when no parameter has a gradient; all zeros when the
        gradient is 0; and empty (no perturbation) when the norm is not finite, as under an fp16 overflow
        (the optimizer step that follows is then skipped by the grad scaler anyway).
    """
    # (param, T^2 g, whether that tensor is a buffer of ours that may be scaled in place, group); for ASAM
    # T^2 g = T (T g) is built in T's own buffer: two temporaries per tensor, as few passes over memory as SAM's.
    scaled: list[tuple[torch.Tensor, torch.Tensor, bool, dict[str, Any]]] = []
    squares = []
    for group in param_groups:
        adaptive_group = group.get("adaptive", adaptive)
        eta_group = group.get("eta", eta)
        for param in _perturbed_parameters(group):
            dtype = torch.promote_types(param.dtype, torch.float32)  # half-precision tensors: the math in fp32
            grad = param.grad.to(dtype)
            if not adaptive_group:
                squares.append(torch.linalg.vector_norm(grad).to(torch.float64) ** 2)
                scaled.append((param, grad, grad is not param.grad, group))
                continue
            scale = param.detach().abs().to(dtype)
            if eta_group:
                scale.add_(eta_group)
            scaled_grad = scale * grad
            squares.append(torch.linalg.vector_norm(scaled_grad).to(torch.float64) ** 2)
            scaled.append((param, scale.mul_(scaled_grad), True, group))
    if not scaled:
        return {}
    norm = torch.sqrt(sum(squares[1:], squares[0]))
    if not torch.isfinite(norm):
        logger.warning("SAM: the gradient norm is %s; no perturbation this step", norm.item())
        return {}
    perturbation = {}
    for param, t2g, owned, group in scaled:
        factor = (group.get("rho", rho) / (norm + _NORM_EPSILON)).to(t2g.dtype)
        perturbation[param] = (t2g.mul_(factor) if owned else t2g * factor).to(param.dtype)
    return perturbation


@torch.no_grad()
def perturb(param_groups: Sequence[dict[str, Any]], **kwargs: Any) -> dict[torch.Tensor, torch.Tensor]:
    """Move every parameter with a gradient to ``theta + e`` in place; returns ``{param: copy of theta}``.

    ``kwargs`` go to :func:`sam_perturbation`. The copies let :func:`restore` put back ``theta`` exactly (not
    ``(theta + e) - e``, which rounds).
    """
    saved = {}
    for param, e in sam_perturbation(param_groups, **kwargs).items():
        saved[param] = param.detach().clone()
        param.add_(e)
    return saved


@torch.no_grad()
def restore(saved: dict[torch.Tensor, torch.Tensor]) -> None:
    """Copy the saved ``theta`` back into each parameter (its ``.grad`` is left as it is)."""
    for param, value in saved.items():
        param.copy_(value)


class SAM(torch.optim.Optimizer):
    """SAM / ASAM around any base optimizer, with the interface of the common PyTorch SAM implementation.

    ```python
    optimizer = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer.base_optimizer, 10, 100)   # or on `optimizer`

    loss_fn(model(x), y).backward()          # gradient at theta
    optimizer.first_step(zero_grad=True)     # theta -> theta + e
    loss_fn(model(x), y).backward()          # gradient at theta + e
    optimizer.second_step(zero_grad=True)    # back to theta, base step with that gradient
    # or, equivalently:  optimizer.step(closure)  with closure() = zero_grad + forward + backward, returning the loss
    ```

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``, ``adaptive``, ``eta`` and any base
            optimizer option).
        base_optimizer: the optimizer class that makes the update (``torch.optim.AdamW``, ``torch.optim.SGD``...),
            built here on the same parameter groups with ``base_optimizer_kwargs``.
        rho: neighbourhood radius; the authors' defaults are 0.05 for SAM and 0.5 for ASAM (``rho >= 0``).
        adaptive: ASAM (scale-invariant neighbourhood ``T = |theta| + eta``).
        eta: ASAM's offset (default 0, the formula ``T = |theta|``; the ASAM paper uses 0.01).

    ``param_groups`` is the base optimizer's list itself, so a learning-rate scheduler built on either object drives
    the update; ``state_dict()`` holds the base optimizer's state (plus ``rho`` / ``adaptive`` / ``eta`` in the
    groups) and ``load_state_dict`` restores both.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        **base_optimizer_kwargs: Any,
    ) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("base_optimizer: pass the optimizer class (e.g. torch.optim.AdamW), not an instance")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta, **base_optimizer_kwargs))
        for index, group in enumerate(self.param_groups):
            if group["rho"] < 0:
                raise ValueError(f"param_groups[{index}].rho must be >= 0, got {group['rho']}")
        self.base_optimizer = base_optimizer(self.param_groups, **base_optimizer_kwargs)
        self.param_groups = self.base_optimizer.param_groups  # one list: schedulers on either object work
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self._saved: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """``theta -> theta + e`` with the gradients now in ``.grad`` (taken at ``theta``)."""
        if self._saved:
            raise RuntimeError("SAM.first_step called twice without second_step")
        self._saved = perturb(self.param_groups)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Back to ``theta``, then the base optimizer's step with the gradients now in ``.grad`` (at ``theta + e``)."""
        restore(self._saved)
        self._saved = {}
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Both steps. ``closure`` must zero the gradients, run forward + backward and return the loss.

        The gradient at ``theta`` is the one in ``.grad`` (from your own ``backward``, as with the common
        implementation: zero the gradients between steps, or the last step's gradient at ``theta + e`` is taken for
        it); when no parameter has one, ``closure`` is called first to compute it. Returns the loss at ``theta`` when this call computed it, else the
        loss at ``theta + e``.
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that recomputes the loss (forward + backward); "
                "or call first_step() / second_step() yourself"
            )
        closure = torch.enable_grad()(closure)
        loss = None
        if not any(_perturbed_parameters(group) for group in self.param_groups):
            loss = closure()
        self.first_step(zero_grad=True)
        perturbed_loss = closure()
        self.second_step()
        return perturbed_loss if loss is None else loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; its groups carry ``rho`` / ``adaptive`` / ``eta`` (shared groups)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
