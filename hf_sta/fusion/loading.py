"""Loading sources from the Hub or disk: full transformers checkpoints and PEFT adapters.

:func:`load_transformers_sources` loads several at once. PEFT adapters whose ``base_model_name_or_path`` is the same
share one copy of that base: they are loaded into one ``PeftModel`` as adapters named after their tasks, and each
source activates its own adapter before it runs (so fusing three LoRA adapters of SmolLM2 holds one SmolLM2, not
three). Full checkpoints and adapters alone on their base load on their own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .sources import TransformersSource

logger = logging.getLogger(__name__)

__all__ = ["load_transformers_source", "load_transformers_sources"]

_LOAD_ERRORS = (OSError, ValueError, KeyError)


def _auto_class(architectures: Sequence[str] | None):
    import transformers

    name = (architectures or [""])[0]
    if name.endswith("ForSequenceClassification"):
        return transformers.AutoModelForSequenceClassification
    if name.endswith("ForCausalLM"):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _load_model(reference: str, load_kwargs: Mapping[str, Any] | None):
    """A full checkpoint with the class its ``config.architectures`` names (``trust_remote_code=False`` passed
    explicitly, so that transformers refuses custom code instead of asking on stdin)."""
    from transformers import AutoConfig

    kwargs = {"dtype": torch.float32, "trust_remote_code": False, **(load_kwargs or {})}
    config = AutoConfig.from_pretrained(reference, trust_remote_code=False)
    return _auto_class(config.architectures).from_pretrained(reference, **kwargs)


def _adapter_config(task: str, reference: str):
    """The ``PeftConfig`` of an adapter folder or Hub repo, ``None`` for anything else."""
    from peft import PeftConfig

    path = Path(reference)
    if path.is_dir():
        return PeftConfig.from_pretrained(reference) if (path / "adapter_config.json").is_file() else None
    try:
        return PeftConfig.from_pretrained(reference)
    except _LOAD_ERRORS:  # not an adapter repo (or unreachable: the model loader reports that)
        return None


def _tokenizer(reference: str, base_reference: str | None):
    from transformers import AutoTokenizer

    if (
        base_reference is not None
        and Path(reference).is_dir()
        and not (Path(reference) / "tokenizer_config.json").is_file()
    ):
        reference = base_reference  # an adapter folder saved without its tokenizer: the base's
    return AutoTokenizer.from_pretrained(reference, trust_remote_code=False)


def _load_error(task: str, reference: str, err: Exception) -> CheckpointError:
    return CheckpointError(f"Source of task {task!r} could not be loaded from {reference!r}: {err}")


def load_transformers_source(
    reference: str | os.PathLike, *, task: str, load_kwargs: Mapping[str, Any] | None = None, **options: Any
) -> TransformersSource:
    """Load a folder or Hub repo (a full checkpoint or a PEFT adapter) as a :class:`TransformersSource`.

    The model class follows ``config.architectures`` (``*ForSequenceClassification``, ``*ForCausalLM``, else
    ``AutoModel``); an adapter loads its ``base_model_name_or_path`` first. ``options`` go to
    :class:`TransformersSource`.

    Raises:
        CheckpointError: naming ``task`` and ``reference`` when neither a model nor an adapter can be loaded.
    """
    text = os.fspath(reference)
    try:
        adapter = _adapter_config(task, text)
        if adapter is not None:
            from peft import PeftModel

            base_reference = adapter.base_model_name_or_path
            model = PeftModel.from_pretrained(_load_model(base_reference, load_kwargs), text)
        else:
            base_reference, model = None, _load_model(text, load_kwargs)
        tokenizer = _tokenizer(text, base_reference)
    except _LOAD_ERRORS as err:
        raise _load_error(task, text, err) from err
    model.eval()
    return TransformersSource(model, tokenizer, reference=text, **options)


def _load_shared(
    references: Mapping[str, str], base_reference: str, options: Mapping[str, Mapping[str, Any]], load_kwargs
) -> dict[str, TransformersSource]:
    """Adapters of one base in one ``PeftModel`` (adapter names = task names), one source per adapter."""
    from peft import PeftModel

    tasks = list(references)
    try:
        base = _load_model(base_reference, load_kwargs)
    except _LOAD_ERRORS as err:
        raise _load_error(tasks[0], references[tasks[0]], err) from err
    model, tokenizers = None, {}
    for task in tasks:
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, references[task], adapter_name=task)
            else:
                model.load_adapter(references[task], adapter_name=task)
            tokenizers[task] = _tokenizer(references[task], base_reference)
        except _LOAD_ERRORS as err:
            raise _load_error(task, references[task], err) from err
    model.eval()
    logger.info("Sources %s share one copy of %s.", tasks, base_reference)
    return {
        task: TransformersSource(
            model, tokenizers[task], reference=references[task], adapter_name=task, **options[task]
        )
        for task in tasks
    }


def load_transformers_sources(
    references: Mapping[str, str | os.PathLike],
    options: Mapping[str, Mapping[str, Any]],
    *,
    load_kwargs: Mapping[str, Any] | None = None,
    share_bases: bool = True,
) -> dict[str, TransformersSource]:
    """``{task: TransformersSource}`` for ``{task: reference}``, in the same order; ``options[task]`` go to each
    :class:`TransformersSource`. With ``share_bases``, PEFT adapters of the same base share one copy of it."""
    texts = {task: os.fspath(reference) for task, reference in references.items()}
    groups: dict[str, list[str]] = {}
    if share_bases:
        for task, text in texts.items():
            try:
                adapter = _adapter_config(task, text)
            except _LOAD_ERRORS as err:
                raise _load_error(task, text, err) from err
            if adapter is not None:
                groups.setdefault(adapter.base_model_name_or_path, []).append(task)
    loaded: dict[str, TransformersSource] = {}
    for base_reference, tasks in groups.items():
        if len(tasks) > 1:
            loaded.update(_load_shared({t: texts[t] for t in tasks}, base_reference, options, load_kwargs))
    for task, text in texts.items():
        if task not in loaded:
            loaded[task] = load_transformers_source(text, task=task, load_kwargs=load_kwargs, **options[task])
    return {task: loaded[task] for task in texts}
