"""Write: a merged or edited model's tensors to a folder, a state dict, a transformers model or a PEFT adapter.

The stream of ``(item, theta, delta, release)`` from the engine is written tensor by tensor (never the whole model
in memory) into an atomic folder (``io.checkpoints.AtomicOutputDir``: nothing half-written on error), with the
companions that make it a usable checkpoint: config and tokenizer from the base, task heads, the recipe, the
importance and statistics the result depends on, and the model card (file names: ``hf_sta.layout``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import ConfigError
from .io.checkpoints import (
    AtomicOutputDir,
    StreamingSafetensorsWriter,
    TensorPlan,
    check_output_dir,
    copy_aux_files,
    save_tensors,
)
from .io.pipeline import intra_op_threads
from .layout import HEADS_FOLDER, IMPORTANCE_FOLDER, RECIPE_NAME, STATISTICS_FOLDER
from .lineage import BASE_KEY, TARGET_KEY, hub_id, hub_metadata, portable_recipe
from .measure import load_transformers_model, quiet_transformers
from .pool import TaskPool

logger = logging.getLogger(__name__)

__all__ = ["CardInputs", "OutputWriter", "full_tensors"]


@dataclass
class CardInputs:
    """What travels with a result besides its weights: the importance / activation statistics it depends on (saved
    next to it, so the recipe re-runs anywhere), the kept fractions and the card's evaluation results and title."""

    importance: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    kept_fraction: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_results: Any = None  # {task: {metric: value}} or EvalResult objects / dicts (hf_sta.card)
    model_name: str | None = None


def full_tensors(deltas: Iterator) -> Iterator[tuple[str, torch.Tensor, Callable[[], None] | None]]:
    """``(name, theta + delta, release)`` in each tensor's planned dtype (math in fp32); ``release``, when not
    ``None``, is to be called once the tensor has been written. Closing it closes ``deltas``."""
    try:
        for item, theta, delta, release in deltas:
            if delta is None:
                yield item.name, theta.to(item.dtype), release
            else:
                yield item.name, delta.add_(theta.float()).to(item.dtype), release
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()


class OutputWriter:
    """Writes engine streams for one :class:`TaskPool`; ``last_adapter_report`` holds the last adapter's report."""

    def __init__(self, pool: TaskPool, *, trust_remote_code: bool = False) -> None:
        self.pool = pool
        self.trust_remote_code = trust_remote_code
        self.last_adapter_report = None
        self.names_only = False  # recipes name local inputs by name, not path (see for_hub)

    @contextlib.contextmanager
    def for_hub(self) -> Iterator[None]:
        """Within the block, written recipes name local inputs by their names (``lineage.portable_recipe``): the
        folder is built in a temporary place only to be pushed."""
        previous, self.names_only = self.names_only, True
        try:
            yield
        finally:
            self.names_only = previous

    def emit(
        self,
        deltas: Iterator,
        plan: list[TensorPlan],
        *,
        recipe: dict[str, Any],
        head_tasks: list[str],
        output_dir: str | os.PathLike | None,
        overwrite: bool,
        max_shard_size: int | str,
        card: CardInputs,
        adapter: dict[str, Any] | None = None,
    ):
        """Write ``theta + delta`` for each ``(item, theta, delta, release)`` (or, with ``adapter``, the deltas as a
        LoRA adapter) to ``output_dir`` and return the path; without ``output_dir`` build the result in memory."""
        options = dict(recipe=recipe, head_tasks=head_tasks, max_shard_size=max_shard_size, adapter=adapter, card=card)
        if output_dir is not None:
            check_output_dir(output_dir, overwrite)
            return self.write(deltas, plan, Path(output_dir), overwrite=overwrite, **options)
        if not getattr(self.pool.base, "config", None):
            if adapter is not None:
                raise ConfigError("An adapter result needs output_dir= when the base is not a transformers model.")
            return {name: tensor for name, tensor, _ in full_tensors(deltas)}
        # A transformers model: stream to a private temporary folder and let transformers (and PEFT) load it, so
        # tied weights, buffers and the config are handled exactly as from_pretrained does.
        tmp_root = Path(tempfile.mkdtemp(prefix="hf_sta-"))
        try:
            folder = self.write(deltas, plan, tmp_root / "model", overwrite=False, private=True, **options)
            with quiet_transformers():
                if adapter is None:
                    return load_transformers_model(folder, trust_remote_code=self.trust_remote_code)
                from peft import PeftModel

                base_model = load_transformers_model(self.pool.base.folder, trust_remote_code=self.trust_remote_code)
                return PeftModel.from_pretrained(base_model, folder)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)

    def write(
        self,
        deltas: Iterator,
        plan: list[TensorPlan],
        output_dir: Path,
        *,
        overwrite: bool,
        recipe: dict[str, Any],
        head_tasks: list[str],
        max_shard_size: int | str,
        adapter: dict[str, Any] | None,
        card: CardInputs,
        private: bool = False,
    ) -> Path:
        """Stream into ``output_dir`` atomically; ``private``: a folder only transformers reads back (no card)."""
        with AtomicOutputDir(output_dir, overwrite=overwrite) as tmp:
            if adapter is not None:
                self._write_adapter(tmp, deltas, adapter, recipe)
            else:
                self._write_weights(tmp, deltas, plan, max_shard_size, "merge" if "merge" in recipe else "forget")
            existing_card = output_dir / "README.md"
            if not private and existing_card.is_file():  # overwriting: the card is updated, not replaced
                shutil.copy2(existing_card, tmp / "README.md")
            self._write_companions(tmp, recipe, head_tasks, plan, adapter is not None, card, private, output_dir)
        (logger.debug if private else logger.info)("Wrote %s", output_dir)
        return output_dir

    def _write_weights(self, folder: Path, deltas: Iterator, plan: list[TensorPlan], max_shard_size, kind: str):
        writer = StreamingSafetensorsWriter(
            folder, plan, max_shard_size=max_shard_size, metadata={"hf_sta": kind}, background=True, any_order=True
        )
        tensors = full_tensors(deltas)
        try:
            with intra_op_threads():
                for key, tensor, release in tensors:
                    writer.write(key, tensor, on_written=release)
            writer.finish()
        finally:
            tensors.close()  # stops the read-ahead thread, if the loop ended early
            writer.abort()

    def _write_adapter(self, folder: Path, deltas: Iterator, options: dict[str, Any], recipe: dict[str, Any]) -> None:
        """The deltas as a PEFT LoRA adapter over the base (truncated SVD per module)."""
        from .io.adapters import lora_layouts, write_lora_adapter

        if self.pool.base_folder is not None:
            layouts = lora_layouts(self.pool.base_folder, trust_remote_code=self.trust_remote_code)
        else:
            layouts = {}
            for vector in self.pool.task_vectors.values():
                layouts.update(getattr(vector, "layouts", {}))
        if options.get("max_rank") is None and options.get("energy") is None:
            raise ConfigError("An adapter output needs max_rank= or energy= to choose each module's LoRA rank.")
        report = write_lora_adapter(
            folder,
            ((item.name, delta) for item, _, delta, _ in deltas if delta is not None),
            base_model_name_or_path=self.pool.sources.get("base"),
            max_rank=options.get("max_rank"),
            energy=options.get("energy"),
            layouts=layouts or None,
            non_lora="skip",
        )
        summary = report.summary()
        recipe["adapter"].update(
            {k: v for k, v in summary.items() if isinstance(v, int | float | str) or k == "skipped"}
        )
        self.last_adapter_report = report

    def _write_companions(
        self, folder: Path, recipe: dict, head_tasks: list[str], plan, adapter: bool, card: CardInputs, private: bool,
        output_dir: Path,
    ) -> None:  # fmt: skip
        """Config/tokenizer from the base (full checkpoints), task heads, shipped measurements, recipe and card."""
        if not adapter:
            copy_aux_files(getattr(self.pool.base, "folder", None), folder)
        out_dtypes = {item.dtype for item in plan if item.dtype.is_floating_point}
        config_path = folder / "config.json"
        if len(out_dtypes) == 1 and config_path.is_file():
            model_config = json.loads(config_path.read_text())
            dtype_name = str(out_dtypes.pop()).removeprefix("torch.")
            model_config["torch_dtype" if "torch_dtype" in model_config else "dtype"] = dtype_name
            config_path.write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
        for task in head_tasks:
            vector = self.pool.task_vectors[task]
            if getattr(vector, "head_keys", None):
                save_tensors(folder / HEADS_FOLDER / f"{task}.safetensors", vector.heads(), {"task": task})
        if not private:
            self._ship_measurements(folder, recipe, card)
            recipe = portable_recipe(recipe, output_dir, self._hub_ids(recipe), names_only=self.names_only)
        (folder / RECIPE_NAME).write_text(yaml.safe_dump(recipe, sort_keys=False))
        if private:
            return
        from .card import write_model_card

        write_model_card(
            folder,
            recipe=recipe,
            kept_fraction=card.kept_fraction or None,
            importance=card.importance or None,
            eval_results=card.eval_results,
            model_name=card.model_name,
            base_metadata=hub_metadata(self.pool.base_folder, getattr(self.pool.base, "config", None)),
        )

    def _hub_ids(self, recipe: dict) -> dict[str, str]:
        """The known repo ids of the recipe's inputs, keyed as ``lineage.portable_recipe`` reads them."""
        ids = {(BASE_KEY if key == "base" else key): repo for key, repo in self.pool.hub_ids.items()}
        target = (recipe.get("forget") or {}).get("target")
        if target and target not in self.pool.task_vectors:
            repo = hub_id(target, target if Path(target).exists() else None)
            if repo:
                ids[TARGET_KEY] = repo
        return ids

    @staticmethod
    def _ship_measurements(folder: Path, recipe: dict, card: CardInputs) -> None:
        """The importance / statistics the result depends on travel with it (paths relative to the output folder),
        so the recipe re-runs anywhere."""
        for key, sub, measured in (
            ("importance", IMPORTANCE_FOLDER, card.importance),
            ("statistics", STATISTICS_FOLDER, card.statistics),
        ):
            if not measured:
                continue
            recipe[key] = {}
            for task, value in measured.items():
                path = value.save(folder / sub / f"{task}.safetensors")
                recipe[key][task] = {"path": path.relative_to(folder).as_posix()}
