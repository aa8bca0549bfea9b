"""The model card of a fused model: ``model_cards/fused.md`` rendered with ``huggingface_hub.ModelCard``.

Every source that is a Hub repo (or, shipped, was copied from one) goes into ``base_model`` (a list); local folders
and in-memory sources are listed in the card's Sources table only (the Hub rejects anything but repo ids in
``base_model``). An existing ``README.md`` is updated (its text outside the hf_sta section and its other metadata are
kept), as for merged models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..card import SECTION_START, hub_model_id, md_escape, update_card
from ..layout import CARD_NAME
from .config import FusionConfig

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from .model import FusedMultiTaskModel

TEMPLATE_NAME = "fused.md"

__all__ = ["fused_template_path", "render_fused_card", "write_fused_card"]


def fused_template_path() -> Path:
    """``model_cards/fused.md`` of a source checkout, else ``hf_sta/model_cards/fused.md`` of a wheel."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package.parent / "model_cards", package / "model_cards"):
        if (folder / TEMPLATE_NAME).is_file():
            return folder / TEMPLATE_NAME
    raise FileNotFoundError(f"Model card template '{TEMPLATE_NAME}' not found in {package.parent / 'model_cards'}.")


def _hub_origin(spec: dict[str, Any]) -> str | None:
    """The Hub repo a source comes from: its reference, or for a shipped copy the reference it was shipped from."""
    return hub_model_id(spec.get("origin") if spec.get("shipped") else spec.get("reference"))


def _source_cell(spec: dict[str, Any]) -> str:
    reference = spec.get("reference")
    if spec.get("shipped"):
        origin = spec.get("origin")
        shipped = f"shipped in `{md_escape(reference)}`"
        return f"{shipped} (from {md_escape(origin)})" if origin else shipped
    repo_id = hub_model_id(reference)
    if repo_id is not None:
        return f"[{md_escape(repo_id)}](https://huggingface.co/{repo_id})"
    return md_escape(reference) if reference else "(nn.Module, pass it again when loading)"


def render_fused_card(config: FusionConfig, model: FusedMultiTaskModel | None = None, title: str = "") -> ModelCard:
    """The card of a fused model: its sources (Hub ids -> ``base_model``, relation ``merge``) and its settings."""
    from huggingface_hub import ModelCard, ModelCardData

    base_models = [repo for spec in config.sources.values() if (repo := _hub_origin(spec))]
    rows = [_source_row(config, task) for task in config.tasks]
    settings = _settings_rows(config, model)
    fusion_text = (
        "an Adaptive Knowledge Fusion (AKF) module reads their components and adds what it learns to each task's own "
        "head input through a zero-initialised projection (before training, every task predicts what its source does)."
        if config.fusion == "akf"
        else "each task's head reads the concatenated pooled features of all sources (simple fusion baseline)."
    )
    data = ModelCardData(
        base_model=base_models or None,
        library_name="hf_sta",
        tags=["hf_sta", "fusion", "multi-task", "text-classification"],
        pipeline_tag="text-classification",
        # several trained models combined into one: the closest relation the Hub knows is a merge
        base_model_relation="merge" if base_models else None,
    )
    return ModelCard.from_template(
        data,
        template_path=str(fused_template_path()),
        title=md_escape(title or "Fused multi-task model"),
        num_sources=len(config.tasks),
        fusion_text=fusion_text,
        first_task_literal=json.dumps(config.tasks[0]),
        sources=rows,
        settings=settings,
    )


def _source_row(config: FusionConfig, task: str) -> dict[str, Any]:
    """One row of the card's sources table."""
    spec = config.sources[task]
    peft = " + PEFT adapter" if spec.get("peft") else ""
    stored = "weights in model.safetensors" if spec["kind"] == "module" else "referenced"
    return {
        "task": md_escape(task),
        "labels": config.num_labels[task],
        "source": _source_cell(spec),
        "architecture": md_escape(f"{spec.get('class', '?')}{peft}"),
        "components": md_escape(spec.get("components", "hooks")),
        "pooling": md_escape(spec.get("pooling", "-")),
        "stored": "shipped" if spec.get("shipped") else stored,
    }


def _settings_rows(config: FusionConfig, model: FusedMultiTaskModel | None) -> list[dict[str, str]]:
    """The card's settings table: the fusion, its sizes for AKF, source LoRA and the parameter counts of ``model``."""
    settings: dict[str, Any] = {"fusion": config.fusion, "seed": config.seed, "dropout": config.dropout}
    if config.fusion == "akf":
        settings.update(
            fusion_dim=config.fusion_dim,
            intra_layers=config.intra_layers,
            inter_layers=config.inter_layers,
            num_heads=config.num_heads,
        )
    if config.source_lora:
        settings["source_lora"] = json.dumps(config.source_lora, default=str)
    if model is not None:
        settings["trainable parameters"] = f"{model.num_parameters(only_trainable=True):,}"
        settings["total parameters"] = f"{model.num_parameters():,}"
    return [{"name": md_escape(k), "value": md_escape(v)} for k, v in settings.items()]


def write_fused_card(folder: str | Path, config: FusionConfig, model: FusedMultiTaskModel | None = None) -> Path:
    """Write (or update) ``folder/README.md``; returns its path."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    path = folder / CARD_NAME
    card = render_fused_card(config, model, title=folder.name.lstrip(".").split(".tmp-")[0])
    if path.is_file():
        existing = ModelCard.load(path, ignore_metadata_errors=True)
        if SECTION_START in existing.text or existing.text.strip():
            card = update_card(existing, card)
    card.save(path)
    return path
