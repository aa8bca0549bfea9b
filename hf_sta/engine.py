"""Select + combine: stream the base's tensors through a merge method, tensor by tensor.

A :class:`MergeContext` is what a method can see (the task vectors, their importance, activation statistics, data for
learned coefficients); the method's ``prepare`` hook (``methods/registry.py``) runs once on it, then
:func:`stream_merge` merges every tensor with the kernel, the per-tensor inputs its ``requires`` names, and what
``prepare`` returned. Tensors are read and merged by worker threads (``io.pipeline``); each result depends on its
inputs only (stochastic kernels get a generator seeded per tensor), so the output does not depend on the scheduling.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import send_to_device

from .auto import search_settings, split_auto
from .config import MergeConfig, parse_dtype
from .errors import ConfigError
from .importance import ImportanceScores
from .io.checkpoints import TensorPlan, TensorSource
from .io.pipeline import PIPELINE_WORKERS, BufferPool, parallel_map
from .methods.registry import MergeMethod, Prepared, get_merge_method
from .pool import TaskPool
from .task_vector import TaskVector

logger = logging.getLogger(__name__)

__all__ = [
    "MergeContext",
    "MergeJob",
    "Stream",
    "check_requirements",
    "merge_job",
    "plan_tensors",
    "stream_merge",
    "task_tau",
    "tensor_seed",
]

Stream = Iterator[tuple[TensorPlan, torch.Tensor, torch.Tensor | None, Callable[[], None] | None]]
"""``(item, theta, delta or None, release or None)`` per base tensor; see :func:`stream_merge`."""


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` that this torch build can use; ``ConfigError`` naming it otherwise."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={device!r}: this torch build sees no CUDA device (torch.cuda.is_available() is False)."
        )
    if resolved.type not in ("cpu", "cuda", "xpu", "mps"):
        raise ConfigError(f"device={device!r}: merges run on 'cpu', 'cuda', 'xpu' or 'mps'.")
    return resolved


def check_num_threads(num_threads: int | None) -> int | None:
    """``None`` (torch's setting) or an integer ``>= 1``; ``ConfigError`` otherwise."""
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ConfigError(f"num_threads must be an integer >= 1 (or None: torch's setting), got {num_threads!r}.")
    return num_threads


def tensor_seed(seed: int, key: str) -> int:
    """Seed of one tensor's generator: independent of the order tensors are processed in."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def plan_tensors(base: TensorSource, dtype: torch.dtype | None) -> list[TensorPlan]:
    """One :class:`TensorPlan` per base tensor; floating tensors take ``dtype`` when given."""
    plan = []
    for key in base.keys():
        base_dtype = base.dtype(key)
        out = dtype if (dtype is not None and base_dtype.is_floating_point) else base_dtype
        plan.append(TensorPlan(key, base.shape(key), out))
    return plan


def task_tau(
    base: TensorSource, vector: TaskVector, key: str, theta_0: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``tau[key]`` (into ``out`` when given), reusing ``theta_0`` only when ``base`` is the vector's own base (a task
    vector built against another model, e.g. passed to ``from_task_vectors(merged, ...)``, must read its own)."""
    own_base = getattr(vector, "base", None)
    return vector.get(key, theta_0 if own_base is None or own_base is base else None, out=out)


@dataclass
class MergeContext:
    """What a merge method may use: the tasks being merged and everything measured or given for them.

    Args:
        pool: base and task vectors.
        tasks: the merged tasks, in order (``T``).
        weights: ``[T]`` per-task weights.
        importance: ``{task: ImportanceScores}`` (``compute_importance`` / ``load_importance``).
        statistics: ``{task: ActivationStatistics}`` (``compute_activation_statistics``).
        objective: inputs of learned methods: ``data``, ``loss_fn``, ``predict_fn`` (``{task: ...}``), ``accelerator``,
            ``model`` (a module whose parameters carry the base's names) and ``task_parameters`` (per-task heads).
        seed: seed of random steps.
    """

    pool: TaskPool
    tasks: list[str]
    weights: torch.Tensor
    importance: Mapping[str, ImportanceScores] = field(default_factory=dict)
    statistics: Mapping[str, Any] = field(default_factory=dict)
    objective: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def vectors(self) -> list[TaskVector]:
        return [self.pool.task_vectors[t] for t in self.tasks]

    def merged_keys(self) -> list[str]:
        """Base tensors at least one merged task vector touches, in base order."""
        vectors = self.vectors
        return [k for k in self.pool.base.keys() if any(k in v for v in vectors)]

    def stacked_tau(self, key: str) -> torch.Tensor:
        """``[T, *shape]`` fp32 task vectors of ``key`` (zeros for tasks that do not touch it)."""
        theta_0 = self.pool.base.get_tensor(key)
        stacked = torch.zeros((len(self.tasks), *theta_0.shape), dtype=torch.float32)
        for index, vector in enumerate(self.vectors):
            if key in vector:
                task_tau(self.pool.base, vector, key, theta_0, out=stacked[index])
        return stacked

    def stacked_scores(self, key: str, shape: tuple[int, ...], what: str = "importance") -> torch.Tensor:
        """``[T, *shape]`` fp32 importance (or Fisher) of ``key``; zeros where a task has none."""
        stacked = torch.zeros((len(self.tasks), *shape), dtype=torch.float32)
        for index, task in enumerate(self.tasks):
            scores = self.importance[task]
            if key in scores:
                stacked[index] = scores[key]
        return stacked

    def importance_rows(self) -> Iterator[torch.Tensor]:
        """Stacked importance ``[T, *shape]`` of every merged tensor, in base order."""
        for key in self.merged_keys():
            yield self.stacked_scores(key, tuple(self.pool.base.shape(key)))

    def grams(self, key: str) -> tuple[torch.Tensor | None, str | None]:
        """``([T, in, in] Gram matrices, layout)`` of the weight ``key``, or ``(None, None)`` when no task has one.

        Each task's Gram is its per-token mean ``X_t^T X_t / n_t`` (as the RegMean authors' code), so tasks with
        more calibration tokens do not weigh more."""
        found = [self.statistics[t] for t in self.tasks if key in self.statistics[t].grams]
        if not found:
            return None, None
        if len(found) != len(self.tasks):
            missing = [t for t in self.tasks if key not in self.statistics[t].grams]
            raise ConfigError(f"Activation statistics of task(s) {', '.join(missing)} have no Gram for '{key}'.")
        return torch.stack([s.grams[key].float() / max(s.num_tokens, 1) for s in found]), found[0].layouts[key]


def check_requirements(context: MergeContext, spec: MergeMethod) -> None:
    """A clear error naming the task and the call that provides what ``spec`` needs and is missing."""
    calls = {
        "importance": "merger.compute_importance(task, calibration_data) or merger.load_importance(task, path)",
        "fisher": "merger.compute_importance(task, calibration_data, metric='fisher', micro_batch_size=1)",
        "gram": "merger.compute_activation_statistics(task, calibration_data) or "
        "merger.load_activation_statistics(task, path)",
    }
    for requirement in spec.requires:
        if requirement == "objective":
            continue  # the method's prepare hook checks its own data
        store = context.statistics if requirement == "gram" else context.importance
        missing = [t for t in context.tasks if t not in store]
        if requirement == "fisher":
            missing += [t for t in context.tasks if t in store and store[t].metric != "fisher"]
        if missing:
            raise ConfigError(
                f"method='{spec.name}' needs {requirement} for task(s) {', '.join(missing)}: call {calls[requirement]}."
            )


def _tensor_inputs(context: MergeContext, spec: MergeMethod, key: str, shape: tuple[int, ...]) -> dict[str, Any]:
    inputs: dict[str, Any] = {}
    if "importance" in spec.requires:
        inputs["importance"] = context.stacked_scores(key, shape)
        inputs["stats"] = {}
    if "fisher" in spec.requires:
        inputs["fisher"] = context.stacked_scores(key, shape, "fisher")
    if "gram" in spec.requires:
        inputs["gram"], inputs["gram_layout"] = context.grams(key)
    return inputs


def stream_merge(
    context: MergeContext,
    config: MergeConfig,
    spec: MergeMethod,
    prepared: Prepared,
    plan: list[TensorPlan],
    kept_fraction: dict[str, dict[str, float]],
    *,
    ordered: bool = True,
    combine: bool = False,
    device: torch.device | None = None,
    workers: int = PIPELINE_WORKERS,
) -> Stream:
    """Yield ``(item, theta_0, scaling * method(stack_t tau_t), None)`` for every base tensor (the delta is ``None``
    for tensors no task vector touches), in plan order, or with ``ordered=False`` as each is ready.

    With ``combine`` the worker threads also add the two: ``(item, theta_0 + delta in the item's dtype, None,
    release)``. Unordered results go to a writer: an fp32 one is then built in a reused buffer, and ``release``
    (else ``None``) must be called once it has been written, to give the buffer back. ``kept_fraction`` receives the
    per-tensor fractions kernels report (STA), in plan order.

    ``device``: where the kernel runs (its inputs are copied there and its result back; reads, writes and the
    addition to ``theta_0`` stay on the CPU); stochastic kernels stay on the CPU, so that their draws do not depend on
    the device. ``workers``: tensors merged at the same time (worker threads).
    """
    vectors, base = context.vectors, context.pool.base
    params = {**config.params, **prepared.params}
    on_device = device is not None and device.type != "cpu" and not spec.stochastic
    if device is not None and device.type != "cpu" and spec.stochastic:
        logger.info("method '%s' draws random numbers: it runs on the CPU, not on %s.", spec.name, device)
    # Each tensor is read and merged by one of PIPELINE_WORKERS threads (see ``ordered`` for the order). The task
    # vectors are read straight into the rows of a stacking buffer (no per-task copy) taken from a pool of reused
    # buffers (no fresh pages to fault in for every tensor).
    pool = BufferPool()

    def merge_tensor(item: TensorPlan) -> tuple[TensorPlan, torch.Tensor, torch.Tensor | None, Any, dict]:
        key = item.name
        if not any(key in v for v in vectors):
            return item, base.get_tensor(key), None, None, {}
        shape = base.shape(key)
        theta_0 = base.get_tensor(key, out=pool.acquire(math.prod(shape), base.dtype(key)).view(shape))
        stacked = pool.acquire(len(vectors) * math.prod(item.shape)).view(len(vectors), *item.shape)
        for index, vector in enumerate(vectors):
            if key in vector:
                task_tau(base, vector, key, theta_0, out=stacked[index])
            else:
                stacked[index].zero_()
        tensor_params = {**params, **_tensor_inputs(context, spec, key, tuple(item.shape))}
        if prepared.per_tensor is not None:
            tensor_params.update(prepared.per_tensor(key))
        generator = torch.Generator().manual_seed(tensor_seed(config.seed, key)) if spec.stochastic else None
        if on_device:  # the kernel on the accelerator, its result back to the CPU
            inputs = send_to_device(tensor_params, device)
            delta = spec.function(stacked.to(device), context.weights, generator=None, **inputs).cpu()
            tensor_params["stats"] = inputs.get("stats", {})
        else:
            delta = spec.function(stacked, context.weights, generator=generator, **tensor_params)
        if delta.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr():
            delta = delta.clone()  # a kernel returning (a view of) its input: the buffer is reused
        pool.release(stacked)
        delta.mul_(config.scaling)
        stats = tensor_params.get("stats", {})
        if combine and not ordered and theta_0.dtype == item.dtype == torch.float32:
            # theta_0 + delta in theta_0's buffer (the same bits as delta + theta_0), back to the pool once written
            output = theta_0.add_(delta)
            return item, output, None, functools.partial(pool.release, output), stats
        if combine:  # theta_0 + delta in the output dtype, here in the worker
            output = delta.add_(theta_0.float()).to(item.dtype)
            pool.release(theta_0)
            return item, output, None, None, stats
        theta = theta_0.clone()  # its buffer goes back to the pool
        pool.release(theta_0)
        return item, theta, delta, None, stats

    tasks = context.tasks
    for item, theta_0, delta, release, stats in parallel_map(merge_tensor, plan, ordered=ordered, workers=workers):
        if "kept_fraction" in stats:
            kept_fraction[item.name] = dict(zip(tasks, stats["kept_fraction"].tolist()))
        yield item, theta_0, delta, release
    kept = dict(kept_fraction)  # in plan order, whatever order the tensors were merged in
    kept_fraction.clear()
    kept_fraction.update({item.name: kept[item.name] for item in plan if item.name in kept})


@dataclass
class MergeJob:
    """A merge ready to write: the stream over ``plan``, its recipe, and what travels with the result."""

    config: MergeConfig
    tasks: list[str]
    prepared: Prepared
    plan: list[TensorPlan]
    recipe: dict[str, Any]
    adapter: dict[str, Any] | None
    stream: Stream
    shipped: tuple[list[str], list[str]]  # tasks whose importance / activation statistics travel with the result


def merge_job(
    pool: TaskPool,
    config: MergeConfig,
    importance: Mapping[str, ImportanceScores],
    statistics: Mapping[str, Any],
    objective: Mapping[str, Any],
    kept_fraction: dict[str, dict[str, float]],
    *,
    prepared: Prepared | None = None,
    ordered_output: bool = False,
    device: torch.device | None = None,
    workers: int = PIPELINE_WORKERS,
) -> MergeJob:
    """Validate ``config``, check the method's requirements, run its ``prepare`` hook (unless ``prepared`` is given)
    and build the stream. ``ordered_output``: the sink needs plan order (a state dict); adapters always do.
    ``scaling="auto"`` / ``density="auto"`` are chosen first on the objective's data (``hf_sta.auto``)."""
    config, auto_request = split_auto(config)
    config = config.validated()
    spec = get_merge_method(config.method)
    tasks = pool.task_list(config.tasks)
    objective = {k: v for k, v in objective.items() if v is not None}
    context = MergeContext(
        pool, tasks, pool.weights(tasks, config.weights), importance, statistics, objective, config.seed
    )
    check_requirements(context, spec)
    if auto_request is not None:
        config, prepared = search_settings(context, config, spec, auto_request)
    if prepared is None:
        prepared = spec.prepare(context, config.params) if spec.prepare is not None else Prepared()
    plan = plan_tensors(pool.base, parse_dtype(config.torch_dtype))
    recipe = {**pool.recipe_inputs(tasks), "merge": dataclasses.asdict(config)}
    learned = {k: v for k, v in prepared.record.items() if k != "auto"}
    if learned:
        recipe["merge"]["learned"] = learned
    if "auto" in prepared.record:
        recipe["merge"]["auto"] = prepared.record["auto"]
    adapter = {"max_rank": config.max_rank, "energy": config.energy} if config.output_format == "adapter" else None
    if adapter:
        recipe.update(output_format="adapter", adapter=dict(adapter))
    # Safetensors output is written at each tensor's place in the file whatever the order; a state dict or an
    # adapter is built in plan order.
    ordered = adapter is not None or ordered_output
    stream = stream_merge(
        context, config, spec, prepared, plan, kept_fraction, ordered=ordered, combine=adapter is None,
        device=device, workers=workers,
    )  # fmt: skip
    shipped = (tasks if spec.requires_importance else [], tasks if "gram" in spec.requires else [])
    return MergeJob(config, tasks, prepared, plan, recipe, adapter, stream, shipped)
