"""STAMerger: the façade over load (``pool``) -> measure (``measure``) -> select + combine (``engine``, ``methods``)
-> write (``output``); forgetting is in ``forgetting``, trained unlearning adapters in ``unlearning``. It holds what
was measured and what was last run."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import measure
from .compression.api import CompressMixin
from .config import MergeConfig, parse_dtype
from .engine import check_device, check_num_threads, merge_job
from .errors import ConfigError
from .forgetting import ForgetMixin, ForgettingCurve
from .importance import ImportanceScores
from .io.pipeline import PIPELINE_WORKERS, torch_threads
from .methods.registry import Prepared
from .output import CardInputs, OutputWriter
from .pool import CheckpointInput, PathOrRepo, TaskPool, open_pool, pool_from_task_vectors
from .unlearning.api import UnlearnMixin

__all__ = ["ForgettingCurve", "STAMerger"]


class STAMerger(ForgetMixin, CompressMixin, UnlearnMixin):
    """Merge several fine-tuned models (or task vectors) of one base model, or forget one of them.

    ```python
    merger = STAMerger.from_pretrained("base", finetuned={"news": "ft-news", "sentiment": "ft-sentiment"})
    model = merger.merge(method="ties", density=0.2)                       # a transformers model, in memory
    merger.merge(method="task_arithmetic", scaling=0.3, output_dir="out")   # streamed to disk, tensor by tensor
    ```
    """

    def __init__(self, pool: TaskPool, *, trust_remote_code: bool = False) -> None:
        self.pool = pool
        self.trust_remote_code = trust_remote_code
        self.importance: dict[str, ImportanceScores] = {}
        self.statistics: dict[str, Any] = {}  # {task: ActivationStatistics}
        self.writer = OutputWriter(pool, trust_remote_code=trust_remote_code)
        # model-index results for the card: {task: {metric: value}}, or EvalResult objects / dicts of their fields
        self.eval_results: Any = None
        self.model_name: str | None = None  # the card's title
        self.last_config: MergeConfig | None = None
        self.last_record: dict[str, Any] = {}  # what the last method's prepare hook recorded (learned coefficients)
        # {tensor name: {task: fraction of entries kept}} of the last STA merge (model card statistics).
        self.last_kept_fraction: dict[str, dict[str, float]] = {}
        self._last_operation: tuple[str, dict[str, Any]] | None = None
        self.last_unlearning: dict[str, Any] | None = None  # what the last unlearn() measured (hf_sta_unlearning.json)

    base = property(lambda self: self.pool.base)
    task_vectors = property(lambda self: self.pool.task_vectors)
    sources = property(lambda self: self.pool.sources)
    tasks = property(lambda self: self.pool.tasks)
    last_adapter_report = property(lambda self: self.writer.last_adapter_report)

    # -- load ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        base_model: CheckpointInput,
        finetuned: Mapping[str, CheckpointInput] | Sequence[PathOrRepo] | None = None,
        *,
        adapters: Mapping[str, PathOrRepo] | Sequence[PathOrRepo] | None = None,
        task_specific: str | Sequence[str] | None = "auto",
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        trust_remote_code: bool = False,
        hub_ids: Mapping[str, str] | None = None,
    ) -> STAMerger:
        """Open the base and every fine-tuned checkpoint or PEFT LoRA adapter (folders, Hub repo ids, state dicts).

        Adapters' task vectors are the dense updates ``scaling * B @ A`` of the weights they adapt. Only headers and
        configs are read here; shapes, architectures and dtypes are checked now, so a bad input fails before any work.
        ``hub_ids``: ``{"base_model" or task: "org/name"}``, the Hub repos local inputs came from, for the model
        card's ``base_model`` lineage (repo ids given as inputs, folders inside the Hub cache and folders whose own card's
        model-index name is a repo id are found alone).
        """
        hub = dict(revision=revision, token=token, cache_dir=cache_dir)
        pool = open_pool(base_model, finetuned, adapters, task_specific=task_specific, hub_ids=hub_ids, **hub)
        return cls(pool, trust_remote_code=trust_remote_code)

    @classmethod
    def from_task_vectors(
        cls,
        base_model: CheckpointInput,
        task_vectors: Mapping[str, PathOrRepo | Any],
        *,
        importance: Mapping[str, PathOrRepo] | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        trust_remote_code: bool = False,
        hub_ids: Mapping[str, str] | None = None,
    ) -> STAMerger:
        """Merge task vectors shipped as files (each site ships ``tau_s`` via ``TaskVector.save`` and optionally its
        importance); ``merge(weights="num_samples")`` weights the sites by the sample counts recorded in them.
        ``hub_ids``: as in :meth:`from_pretrained`."""
        pool = pool_from_task_vectors(
            base_model, task_vectors, hub_ids, revision=revision, token=token, cache_dir=cache_dir
        )
        merger = cls(pool, trust_remote_code=trust_remote_code)
        for name, path in (importance or {}).items():
            merger.load_importance(name, path)
        return merger

    # -- measure -----------------------------------------------------------------------------------------------------
    def compute_importance(
        self,
        task: str,
        data: Any = None,
        *,
        metric: str = "taylor",
        num_samples: int | None = 256,
        micro_batch_size: int = 8,
        loss_fn: Callable | None = None,
        model: torch.nn.Module | None = None,
        **options: Any,
    ) -> ImportanceScores:
        """Score every parameter of ``task`` by how much its loss depends on it (``hf_sta.importance.metrics``).

        Gradients are taken at the task's fine-tuned model with its own loss (or ``loss_fn(model, batch)``) on
        ``data`` (a ``datasets.Dataset``, raw text tokenized with ``tokenizer=`` or the model's own, or a
        ``DataLoader``), one micro-batch of ``micro_batch_size`` samples at a time (``1``: per-sample scores, the
        standard empirical Fisher for ``metric="fisher"``), over the first ``num_samples`` samples.
        ``metric="magnitude"`` needs no data. Runs on CPU, one GPU, or under ``accelerate launch`` (the processes
        split the data and their sums are reduced once). ``options``: tokenizer, collate_fn, accelerator,
        gradient_checkpointing, torch_dtype, text_column, label_column, max_length, show_progress.
        """
        scores = measure.compute_importance(
            self.pool, task, data, metric=metric, num_samples=num_samples, micro_batch_size=micro_batch_size,
            loss_fn=loss_fn, model=model, trust_remote_code=self.trust_remote_code, **options,
        )  # fmt: skip
        self.importance[task] = scores
        return scores

    def save_importance(self, task: str, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``task``'s importance (safetensors + metadata: metric, samples, dataset fingerprint, model hash),
        atomically; an existing file is refused unless ``overwrite``."""
        scores = _saved(self.importance, task, "importance", "compute_importance(task, data)")
        return scores.save(path, overwrite=overwrite)

    def load_importance(self, task: str, path: str | os.PathLike) -> ImportanceScores:
        """Load importance saved by :meth:`save_importance`; refuses scores of another model or of other tensors."""
        self.importance[task] = measure.load_importance(self.pool, task, path)
        return self.importance[task]

    def compute_activation_statistics(
        self, task: str, data: Any, *, num_samples: int | None = 256, micro_batch_size: int = 8, **options: Any
    ):
        """Gram matrices ``G = X^T X`` of the inputs of every linear layer of ``task``'s own fine-tuned model on
        ``data`` (padding excluded), what ``method="regmean"`` needs; same data forms and accelerate loop as
        :meth:`compute_importance`. ``options``: model, forward_fn, tokenizer, collate_fn, accelerator,
        text_column, max_length, show_progress. Kept for merging and returned; see :meth:`save_activation_statistics`.
        """
        stats = measure.compute_activation_statistics(
            self.pool, task, data, num_samples=num_samples, micro_batch_size=micro_batch_size,
            trust_remote_code=self.trust_remote_code, **options,
        )  # fmt: skip
        self.statistics[task] = stats
        return stats

    def save_activation_statistics(self, task: str, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``task``'s activation statistics as one safetensors file (never the data they come from),
        atomically; an existing file is refused unless ``overwrite``."""
        stats = _saved(self.statistics, task, "activation statistics", "compute_activation_statistics")
        return stats.save(path, overwrite=overwrite)

    def load_activation_statistics(self, task: str, path: str | os.PathLike):
        """Load statistics saved by :meth:`save_activation_statistics`; refuses Grams that do not fit the task."""
        self.statistics[task] = measure.load_activation_statistics(self.pool, task, path)
        return self.statistics[task]

    # -- merge -------------------------------------------------------------------------------------------------------
    def merge(
        self,
        method: str = "task_arithmetic",
        *,
        scaling: float | str | Sequence[float] | None = None,
        weights: Mapping[str, float] | Sequence[float] | str | None = None,
        tasks: Sequence[str] | None = None,
        output_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        torch_dtype: str | torch.dtype | None = None,
        seed: int = 0,
        max_shard_size: int | str = "5GB",
        output_format: str = "full",
        max_rank: int | None = None,
        energy: float | None = None,
        data: Mapping[str, Any] | None = None,
        loss_fn: Mapping[str, Callable] | None = None,
        predict_fn: Mapping[str, Callable] | None = None,
        validation_data: Mapping[str, Any] | None = None,
        accelerator: Any = None,
        model: torch.nn.Module | None = None,
        device: str | torch.device | None = None,
        num_threads: int | None = None,
        **params: Any,
    ):
        """Merge the task vectors: ``theta = theta_0 + scaling * method({tau_t}, weights, **params)``.

        ``method``: any registered one (``hf-sta methods``); ``params`` its own parameters; ``scaling``: default the
        method's ``default_scaling`` (1 for every method but ``sta``, whose default density was chosen with it).
        ``weights``: per task (mapping or list in task order) or ``"num_samples"``. ``output_dir``: stream the result there (safetensors
        shards, config, tokenizer, heads, recipe, card) and return the path; else return the model in memory (a
        transformers model when the base has a config, else a state dict). ``output_format="adapter"``: the merged
        delta as a PEFT LoRA adapter (truncated SVD, rank ``max_rank`` or the smallest keeping ``energy``).
        ``torch_dtype``: output dtype (math is fp32). ``seed``: random methods (DARE) and learned ones.

        Learned methods (``adamerging``, ``dv_basi``) take ``data={task: data}`` with ``loss_fn={task:
        fn(model, batch) -> loss}`` (supervised) or ``predict_fn={task: fn(model, batch) -> logits}`` (entropy), and
        ``accelerator`` (``validation_data={task: data}``: DV-BASI's plateau test) and ``model`` (the module they
        call through ``functional_call``; required when the base is a state dict); the coefficients go to
        :attr:`last_record`, the recipe and the card.

        ``scaling="auto"`` (any method) and ``density="auto"`` (``sta``, ``ties``, ``dare_*``, ``magnitude_prune``)
        are chosen from a small grid (or the list given) by the same objective on the same ``data`` (``hf_sta.auto``);
        the choice and every evaluation go to ``last_record["auto"]``, the recipe and the card.

        ``device``: where the kernels run (e.g. ``"cuda"`` for the SVD- and solve-based methods ``tsv``, ``iso_*``,
        ``cart``, ``wudi``, ``regmean``); reading, writing and the output stay on the CPU, and methods that draw random
        numbers (DARE) stay on the CPU. ``num_threads``: CPU threads the merge uses (torch's intra-op threads, and at
        most that many tensors merged at once); default: torch's setting. Neither changes the recipe.
        """
        dtype = parse_dtype(torch_dtype)
        config = MergeConfig(
            method=method, scaling=scaling, tasks=list(tasks) if tasks is not None else None, params=params,
            weights=dict(weights) if isinstance(weights, Mapping) else (
                weights if isinstance(weights, str) or weights is None else list(weights)),
            seed=seed, torch_dtype=str(dtype).removeprefix("torch.") if dtype else None, max_shard_size=max_shard_size,
            output_format=output_format, max_rank=max_rank, energy=energy,
        )  # fmt: skip
        objective = dict(data=data, loss_fn=loss_fn, predict_fn=predict_fn, validation_data=validation_data,
                         accelerator=accelerator, model=model)  # fmt: skip
        return self.run(config, output_dir=output_dir, overwrite=overwrite, objective=objective, device=device,
                        num_threads=num_threads)  # fmt: skip

    def run(
        self,
        config: MergeConfig,
        *,
        output_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        objective: dict[str, Any] | None = None,
        prepared: Prepared | None = None,
        device: str | torch.device | None = None,
        num_threads: int | None = None,
    ):
        """Execute a :class:`MergeConfig` (what :meth:`merge` and the CLI call); ``prepared``: reuse what the
        method's ``prepare`` hook returned before (learned coefficients) instead of running it again; ``device``,
        ``num_threads``: as in :meth:`merge`."""
        device, num_threads = check_device(device), check_num_threads(num_threads)
        workers = min(PIPELINE_WORKERS, num_threads or PIPELINE_WORKERS)
        self.last_kept_fraction = {}
        ordered_output = output_dir is None and not getattr(self.base, "config", None)
        job = merge_job(self.pool, config, self.importance, self.statistics, objective or {}, self.last_kept_fraction,
                        prepared=prepared, ordered_output=ordered_output, device=device, workers=workers)  # fmt: skip
        self.last_config, self.last_record = job.config, job.prepared.record
        self._last_operation = ("merge", {"config": job.config, "objective": objective, "prepared": job.prepared,
                                          "device": device, "num_threads": num_threads})  # fmt: skip
        with torch_threads(num_threads):
            return self.writer.emit(
                job.stream, job.plan, recipe=job.recipe, head_tasks=job.tasks, output_dir=output_dir,
                overwrite=overwrite, max_shard_size=job.config.max_shard_size, card=self._card_inputs(*job.shipped),
                adapter=job.adapter,
            )  # fmt: skip

    def _card_inputs(self, importance_tasks: list[str], statistics_tasks: list[str]) -> CardInputs:
        return CardInputs(
            importance={t: self.importance[t] for t in importance_tasks},
            statistics={t: self.statistics[t] for t in statistics_tasks},
            kept_fraction=self.last_kept_fraction,
            eval_results=self.eval_results,
            model_name=self.model_name,
        )

    # -- save / push -------------------------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, *, overwrite: bool = False, eval_results: Any = None
    ) -> Path:
        """Write the result of the last :meth:`merge` or :meth:`forget` to ``save_directory`` (streamed: the result is
        recomputed tensor by tensor, never held), with its config, tokenizer, heads, recipe and model card.
        ``eval_results``: ``{task: {metric: value}}`` measured on the result (or ``huggingface_hub.EvalResult``
        objects), written to the card as ``model-index`` (kept in :attr:`eval_results` for later saves)."""
        if eval_results is not None:
            self.eval_results = eval_results
        if self._last_operation is None:
            raise ConfigError("Nothing to save: call merge(...) or forget(...) first.")
        kind, arguments = self._last_operation
        if kind == "merge":
            return self.run(output_dir=save_directory, overwrite=overwrite, **arguments)
        return self.forget(**arguments, output_dir=save_directory, overwrite=overwrite)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        revision: str | None = None,
        output_dir: str | os.PathLike | None = None,
        eval_results: Any = None,
    ):
        """Save the last merge/forget (to ``output_dir``, kept; else to a temporary folder, removed after a successful
        upload and kept, and named in the error, after a failed one) and upload it as one commit to ``repo_id`` with
        :func:`hf_sta.hub.push_folder` (repo and ``revision`` branch created when missing; an existing card is
        updated). ``eval_results``: as in :meth:`save_pretrained`. Returns the ``CommitInfo``."""
        from .hub import check_repo_id, save_and_push

        check_repo_id(repo_id)
        if eval_results is not None:
            self.eval_results = eval_results
        if self._last_operation is None:
            raise ConfigError("Nothing to push: call merge(...) or forget(...) first.")
        message = commit_message or f"hf_sta: {self._last_operation[0]} with hf_sta"
        with self.writer.for_hub() if output_dir is None else contextlib.nullcontext():
            return save_and_push(self.save_pretrained, repo_id, output_dir=output_dir, private=private, token=token,
                                 commit_message=message, create_pr=create_pr, revision=revision)  # fmt: skip


def _saved(store: Mapping[str, Any], task: str, what: str, call: str) -> Any:
    if task not in store:
        raise ConfigError(f"No {what} for task '{task}': call {call} first.")
    return store[task]
