"""Forget: remove a task from a model, ``theta' = theta - scaling * m_f * tau_f`` (``m_f``: STA's importance mask of
the forgotten task, or all ones for plain negation), and choose ``scaling`` on a forgetting curve."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .config import parse_dtype
from .engine import plan_tensors, task_tau
from .errors import ConfigError
from .importance import ImportanceScores
from .io.checkpoints import TensorPlan, TensorSource, open_checkpoint
from .methods import get_merge_method
from .methods.sta import DEFAULT_FORGET_DENSITY, forget_delta, global_thresholds
from .pool import TaskPool, check_compatible
from .task_vector import TaskVector
from .unlearning.rules import DEFAULT_MIN_CONTROL, Bisection, choose_scaling, resolve_scalings

logger = logging.getLogger(__name__)

__all__ = [
    "FORGET_METHODS",
    "ForgetJob",
    "ForgettingCurve",
    "forget_job",
    "check_scaling",
    "forget_params",
    "forget_stream",
    "forget_target",
    "pick_scaling",
]

FORGET_METHODS = ("sta", "negation")


def forget_params(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """STA's selection parameters for forgetting (validated, ``density`` defaulting to ``DEFAULT_FORGET_DENSITY``)."""
    if method not in FORGET_METHODS:
        raise ConfigError(f"forget method must be 'sta' or 'negation', got {method!r}.")
    if method == "negation" and params:
        raise ConfigError(f"method='negation' takes no selection parameters, got {', '.join(params)}.")
    params = get_merge_method("sta").validate_params({k: v for k, v in params.items() if v is not None})
    params.pop("overlap")
    if method == "sta" and params.get("density") is None and params.get("threshold") is None:
        params["density"] = DEFAULT_FORGET_DENSITY
    return params


def check_scaling(scaling: Any, name: str = "scaling") -> float:
    """``scaling`` as a float; a bool, a non-number, NaN or +-inf raises :class:`ConfigError` naming ``name`` (a
    NaN/inf scaling would write a checkpoint full of NaN)."""
    if isinstance(scaling, bool) or not isinstance(scaling, int | float) or not math.isfinite(scaling):
        raise ConfigError(f"{name} must be a finite number, got {scaling!r}.")
    return float(scaling)


def forget_target(pool: TaskPool, target: str | os.PathLike | None) -> tuple[TensorSource | None, TaskVector | None]:
    """The model to edit: ``(None, None)`` the base, ``(None, tau)`` a loaded task's fine-tune, or a checkpoint."""
    if target is None:
        return None, None
    if isinstance(target, str) and target in pool.task_vectors:
        return None, pool.task_vectors[target]
    source = open_checkpoint(target, name=str(target))
    check_compatible(source, pool.base, f"Forget target '{target}'", every=True)
    return source, None


def forget_stream(
    pool: TaskPool,
    task: str,
    scores: ImportanceScores | None,
    params: dict[str, Any],
    plan: list[TensorPlan],
    *,
    scaling: float,
    target: str | os.PathLike | None,
) -> Iterator[tuple[TensorPlan, torch.Tensor, torch.Tensor | None, None]]:
    """``(item, theta, -scaling * m_f tau_f or None, None)`` per base tensor, ``theta`` the target's tensor."""
    scaling = check_scaling(scaling)
    vector = pool.vector(task)
    target_source, target_vector = forget_target(pool, target)
    if scores is not None and params.get("density") is not None and params.get("density_scope") == "global":
        keys = [k for k in pool.base.keys() if k in vector]

        def rows():
            for key in keys:
                yield (scores[key] if key in scores else torch.zeros(pool.base.shape(key))).unsqueeze(0)

        params = {**params, "global_threshold": global_thresholds(rows, 1, params["density"], params["normalize"])}
    else:
        params = {**params, "global_threshold": None}
    base = pool.base
    for item in plan:
        key = item.name
        theta_0 = base.get_tensor(key)
        theta = theta_0 if target_source is None else target_source.get_tensor(key)
        if target_vector is not None and key in target_vector:
            theta = theta_0.float() + task_tau(base, target_vector, key, theta_0)
        if key not in vector:
            yield item, theta, None, None
            continue
        edit = task_tau(base, vector, key, theta_0)
        if scores is not None:
            importance = scores[key] if key in scores else torch.zeros(item.shape)
            edit = forget_delta(edit, importance, **params)
        yield item, theta, edit.mul_(-float(scaling)), None


@dataclasses.dataclass
class ForgetJob:
    """A forget ready to write: the edit stream over ``plan``, its recipe, and what travels with it."""

    stream: Iterator
    plan: list[TensorPlan]
    recipe: dict[str, Any]
    head_tasks: list[str]
    adapter: dict[str, Any] | None
    importance_tasks: list[str]


def forget_job(
    pool: TaskPool,
    importance: Mapping[str, ImportanceScores],
    task: str,
    *,
    scaling: float,
    method: str,
    target: str | os.PathLike | None,
    torch_dtype: str | torch.dtype | None,
    as_adapter: bool,
    max_rank: int | None,
    energy: float | None,
    params: dict[str, Any],
) -> ForgetJob:
    """Check the inputs of :meth:`STAMerger.forget` and build its edit stream and recipe (nothing is read yet)."""
    scaling = check_scaling(scaling)
    params = forget_params(method, params)
    pool.vector(task)
    if method == "sta" and task not in importance:
        raise ConfigError(
            f"forget(method='sta') needs importance for task {task}: call merger.compute_importance(task, "
            "calibration_data) or merger.load_importance(task, path) (or method='negation')."
        )
    scores = importance[task] if method == "sta" else None
    if as_adapter and target is not None:
        raise ConfigError(
            "forget(as_adapter=True) writes an adapter over the base model; target= must be None. (Forget "
            "from a merged model by loading it as the base: STAMerger.from_task_vectors(merged, ...).)"
        )
    plan = plan_tensors(pool.base, parse_dtype(torch_dtype))
    stream = forget_stream(pool, task, scores, params, plan, scaling=scaling, target=target)
    recipe: dict[str, Any] = {
        **pool.recipe_inputs([task]),
        "forget": {"task": task, "method": method, "scaling": float(scaling), "target": str(target) if target else None,
                   "params": {k: v for k, v in params.items() if k != "global_threshold"}},
    }  # fmt: skip
    adapter = {"max_rank": max_rank, "energy": energy} if as_adapter else None
    if adapter:
        recipe.update(output_format="adapter", adapter=dict(adapter))
    head_tasks = [target] if isinstance(target, str) and target in pool.task_vectors else []
    return ForgetJob(stream, plan, recipe, head_tasks, adapter, [task] if scores is not None else [])


@dataclasses.dataclass
class ForgettingCurve:
    """What :meth:`STAMerger.tune_forgetting` measured: one point per evaluated scaling (``{"scaling", "target",
    "control"}``), the unedited model's metrics (``baseline``), the rule and the chosen scaling."""

    task: str
    method: str
    baseline: dict[str, float]
    points: list[dict[str, float]]
    min_control: float
    best_scaling: float | None
    rule: str = "largest_drop"
    chance: float | None = None


def pick_scaling(
    task: str,
    method: str,
    edit: Callable[[float], Any],
    eval_fn: Callable[[Any], float],
    control_fn: Callable[[Any], float],
    scalings: Sequence[float] | Bisection | str,
    min_control: float | None,
    *,
    rule: str = "largest_drop",
    chance: float | None = None,
) -> ForgettingCurve:
    """Evaluate the edits ``edit(scaling)`` (``scaling=0``: the unedited model) and choose a scaling by ``rule``
    (:mod:`hf_sta.unlearning.rules`: ``"largest_drop"`` or ``"closest_to_chance"``) among those whose ``control_fn``
    stays ``>= min_control`` times its value on the unedited model (default 0.95 / 0.98 for the two rules)."""
    scalings = resolve_scalings(scalings, rule)
    min_control = DEFAULT_MIN_CONTROL[rule] if min_control is None else float(min_control)
    unedited = edit(0.0)
    baseline = {"target": float(eval_fn(unedited)), "control": float(control_fn(unedited))}
    del unedited

    def evaluate(scaling: float) -> dict[str, float]:
        model = edit(scaling)
        return {"scaling": float(scaling), "target": float(eval_fn(model)), "control": float(control_fn(model))}

    points, best = choose_scaling(evaluate, baseline, rule=rule, scalings=scalings, min_control=min_control,
                                  chance=chance)  # fmt: skip
    return ForgettingCurve(task, method, baseline, points, min_control, best, rule, chance)


class ForgetMixin:
    """``forget`` and ``tune_forgetting`` of :class:`~hf_sta.STAMerger` (uses its ``pool``, ``importance`` and
    ``writer``)."""

    def forget(
        self,
        task: str,
        *,
        scaling: float = 1.0,
        method: str = "sta",
        target: str | os.PathLike | None = None,
        output_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        torch_dtype: str | torch.dtype | None = None,
        max_shard_size: int | str = "5GB",
        as_adapter: bool = False,
        max_rank: int | None = None,
        energy: float | None = 0.999,
        **params: Any,
    ):
        """Remove ``task`` from a model: ``theta' = theta - scaling * m_f * tau_f``.

        ``method``: ``"sta"`` (subtract the task's important entries; ``threshold``/``density``/``density_scope``/
        ``normalize`` as in the STA merge; needs its importance) or ``"negation"`` (the whole task vector).
        ``target``: the model to edit: ``None`` (the base), a loaded task's name (its fine-tune), or a checkpoint with
        the base's tensor names (e.g. a merged model). ``as_adapter``: write the edit as a PEFT LoRA adapter over the
        base (rank ``max_rank`` / ``energy``): enabled, the task is forgotten; removed, the model is the original.
        ``scaling``: see :meth:`tune_forgetting`. Other arguments as in :meth:`merge`.
        """
        options = dict(scaling=scaling, method=method, target=target, torch_dtype=torch_dtype, as_adapter=as_adapter,
                       max_rank=max_rank, energy=energy)  # fmt: skip
        self._last_operation = ("forget", {"task": task, "max_shard_size": max_shard_size, **options, **params})
        job = forget_job(self.pool, self.importance, task, params=params, **options)
        if output_dir is not None and job.recipe["forget"]["scaling"] == 0.0:  # tune_forgetting's baseline is 0 too
            logger.warning(
                "forget(scaling=0) writes '%s' unchanged: nothing of task '%s' is removed.", output_dir, task
            )
        self.last_kept_fraction = {}
        return self.writer.emit(
            job.stream, job.plan, recipe=job.recipe, head_tasks=job.head_tasks, output_dir=output_dir,
            overwrite=overwrite, max_shard_size=max_shard_size, card=self._card_inputs(job.importance_tasks, []),
            adapter=job.adapter,
        )  # fmt: skip

    def tune_forgetting(
        self,
        task: str,
        eval_fn: Callable[[Any], float],
        control_fn: Callable[[Any], float],
        *,
        scalings: Sequence[float] | Bisection | str = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0),
        min_control: float | None = None,
        rule: str = "largest_drop",
        chance: float | None = None,
        method: str = "sta",
        target: str | os.PathLike | None = None,
        **params: Any,
    ) -> ForgettingCurve:
        """Pick the forgetting ``scaling`` on a forgetting curve. Each function receives the edited model (as
        :meth:`forget` returns it in memory): ``eval_fn`` scores the forgotten task, ``control_fn`` the others.

        ``rule="largest_drop"`` (task-vector negation's): the lowest ``eval_fn`` among the scalings whose
        ``control_fn`` stays ``>= min_control`` (default 0.95) times its value on the unedited target.
        ``rule="closest_to_chance"``: the allowed scaling (``min_control`` default 0.98; the unedited model counts as
        scaling 0) whose ``eval_fn`` is nearest ``chance``. ``scalings``: a grid, or ``"bisect"`` /
        :class:`~hf_sta.unlearning.Bisection` (``closest_to_chance`` only) to halve ``[low, high]`` towards chance.
        """
        edit = functools.partial(self.forget, task, method=method, target=target, **params)
        return pick_scaling(task, method, lambda s: edit(scaling=s), eval_fn, control_fn, scalings, min_control,
                            rule=rule, chance=chance)  # fmt: skip
