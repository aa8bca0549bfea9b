"""``STAMerger.unlearn``: resolve the target and the data, train the unlearning adapter, return it or write it.

```python
adapter = merger.unlearn("merged/", forget_data=site_b_rows, retain_data={"a": site_a_rows, "c": site_c_rows})
with adapter.disable_adapter():      # the merged model again, bit for bit
    ...
merger.unlearn(merged_model, news_rows, {"sst2": sst2_rows}, loss_fn=..., forget_loss="prior", goal=0.25,
               output_dir="forget-news")     # adapter_model.safetensors, adapter_config.json, hf_sta_unlearning.json
```
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..io.checkpoints import AtomicOutputDir, check_output_dir, open_checkpoint
from ..pool import TaskPool, check_compatible
from .config import UnlearnConfig
from .data import check_disjoint, prepare_sources
from .training import unlearn_model

__all__ = ["UNLEARNING_RECORD", "UnlearnMixin", "resolve_target"]

UNLEARNING_RECORD = "hf_sta_unlearning.json"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def resolve_target(pool: TaskPool, target: Any, *, trust_remote_code: bool = False) -> tuple[nn.Module, Path | None]:
    """The model to unlearn from and its folder: ``None`` (the base), a loaded task's name (its fine-tune), an
    ``nn.Module`` or a checkpoint folder / repo id. Modules and checkpoints must hold every base tensor with the base's
    name and shape (:class:`~hf_sta.errors.CheckpointError` otherwise)."""
    from ..measure import load_finetuned_model, load_transformers_model

    if isinstance(target, str) and target in pool.task_vectors:
        vector = pool.vector(target)
        return load_finetuned_model(pool, target, trust_remote_code=trust_remote_code), getattr(
            getattr(vector, "finetuned", None), "folder", None
        )
    if target is None:
        if pool.base_folder is None:
            raise ConfigError("unlearn(target=None) needs a transformers base checkpoint; pass the model as target=.")
        return load_transformers_model(pool.base_folder, trust_remote_code=trust_remote_code), pool.base_folder
    if isinstance(target, nn.Module):
        # non-persistent buffers (position_ids) count: some checkpoints store them, state_dict() leaves them out
        tensors = {**dict(target.named_buffers()), **dict(target.named_parameters())}
        check_compatible(open_checkpoint(tensors, name="target"), pool.base, "unlearn target", every=True)
        return target, None
    source = open_checkpoint(target, name=str(target))
    check_compatible(source, pool.base, f"unlearn target '{target}'", every=True)
    folder = getattr(source, "folder", None)
    if folder is None or not getattr(source, "config", None):
        raise ConfigError(f"unlearn target '{target}' is not a transformers checkpoint folder; pass the model itself.")
    return load_transformers_model(folder, trust_remote_code=trust_remote_code), folder


def _tokenizer(folders: list[Path | None]) -> Any:
    from transformers import AutoTokenizer

    for folder in folders:
        if folder is not None and any((Path(folder) / name).is_file() for name in _TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(folder)
    return None


def _config(config: UnlearnConfig | None, method: str | None, layers: Any, options: dict[str, Any]) -> UnlearnConfig:
    fields = {f.name for f in dataclasses.fields(UnlearnConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"unlearn: unknown option(s) {', '.join(unknown)}; UnlearnConfig fields: {', '.join(sorted(fields))}."
        )
    given = {k: v for k, v in {"method": method, "layers": layers, **options}.items() if v is not None}
    return dataclasses.replace(config, **given) if config is not None else UnlearnConfig(**given)


class UnlearnMixin:
    """``unlearn`` of :class:`~hf_sta.STAMerger` (uses its ``pool``)."""

    last_unlearning: dict[str, Any] | None = None

    def unlearn(
        self,
        target: Any,
        forget_data: Any,
        retain_data: Any,
        *,
        method: str | None = None,
        layers: str | int | list[str | int] | None = None,
        config: UnlearnConfig | None = None,
        loss_fn: Callable | dict[str, Callable] | None = None,
        predict_fn: Callable | dict[str, Callable] | None = None,
        eval_fn: Callable[[nn.Module], float] | None = None,
        tokenizer: Any = None,
        accelerator: Any = None,
        output_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        show_progress: bool = True,
        **options: Any,
    ):
        """Forget ``forget_data`` from ``target`` with a trained, removable LoRA adapter (FUSED, Zhong et al., CVPR
        2025, arXiv 2502.20709): score each layer's sensitivity to the forget data relative to the retain data, put
        LoRA adapters (``r=16``, ``alpha=32``) on the critical layers only, and train them with the target frozen on
        ``L_retain + forget_weight * L_forget`` until the forget metric reaches ``goal``.

        ``target``: ``None`` (the base), a loaded task's name, a checkpoint folder with the base's tensor names (a
        merge), or an ``nn.Module`` (wrapped in place, as ``peft.get_peft_model`` does; its weights are not changed).
        ``forget_data`` / ``retain_data``: a ``datasets.Dataset`` (text + label, or tokenized), a ``DataLoader``, or
        ``{name: data}`` with ``loss_fn={name: fn(model, batch) -> loss}`` (and ``predict_fn={name: fn -> logits}``)
        for models whose outputs depend on the source (e.g. a merged body with one head per task). Defaults:
        ``model(**batch).loss`` and ``model(**inputs).logits``. ``method``, ``layers`` and ``options`` are
        :class:`~hf_sta.unlearning.UnlearnConfig` fields (``forget_loss``, ``goal``, ``max_steps``, ...), applied over
        ``config``. ``eval_fn(model) -> float``: the forget metric for the early stop (default: forget accuracy).

        Returns the ``PeftModel`` (eval mode), or with ``output_dir`` the path of a PEFT adapter folder
        (``adapter_model.safetensors``, ``adapter_config.json``, ``hf_sta_unlearning.json``: chosen layers, scores,
        steps, metric history, cost). The record is also kept as :attr:`last_unlearning`.
        """
        from ..importance.calibration import default_loss

        config = _config(config, method, layers, options)
        if output_dir is not None:
            check_output_dir(output_dir, overwrite)
        model, folder = resolve_target(self.pool, target, trust_remote_code=getattr(self, "trust_remote_code", False))
        tokenizer = tokenizer or _tokenizer([folder, self.pool.base_folder])
        architectures = getattr(getattr(model, "config", None), "architectures", None) or []
        causal_lm = any(a.endswith("ForCausalLM") for a in architectures)
        common = dict(tokenizer=tokenizer, config=config, causal_lm=causal_lm)
        forget = prepare_sources(forget_data, "forget_data", loss_fn or default_loss, predict_fn, **common)
        retain = prepare_sources(retain_data, "retain_data", loss_fn or default_loss, predict_fn, **common)
        check_disjoint(forget, retain)
        result = unlearn_model(model, forget, retain, config, eval_fn=eval_fn, accelerator=accelerator,
                               show_progress=show_progress)  # fmt: skip
        self.last_unlearning = result.record
        if output_dir is None:
            return result.model
        with AtomicOutputDir(output_dir, overwrite=overwrite) as tmp:
            result.model.save_pretrained(tmp)
            (tmp / UNLEARNING_RECORD).write_text(json.dumps(result.record, indent=2, default=str) + "\n")
        return Path(output_dir)
