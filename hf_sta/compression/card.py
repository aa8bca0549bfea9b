"""The model card of a compressed checkpoint (``model_cards/compressed.md``): size before / after, kept tasks, the
ranking rule, recovery and the measured accuracy when given."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..card import RELATIONS, hub_model_id, md_escape, md_prose, template_path
from ..layout import CARD_NAME
from ..lineage import pipeline_tag

__all__ = ["write_compressed_card"]

_WIDTHS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
           "non_embedding_parameters", "parameters")  # fmt: skip


def _size(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def _removed(original: Mapping[str, int], compressed: Mapping[str, int]) -> str:
    """``"attention heads (whole key/value groups), FFN neurons and layers"``: what went, in words."""
    parts = [
        words
        for key, words in (
            ("num_attention_heads", "attention heads (whole key/value groups)"),
            ("intermediate_size", "FFN neurons"),
            ("num_hidden_layers", "layers"),
        )
        if compressed[key] < original[key]
    ]
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts) or "no structures"


def _accuracy_rows(compressed: Mapping[str, float], uncompressed: Mapping[str, float]) -> list[dict[str, str]]:
    """One row per task: compressed accuracy, and when measured the uncompressed one and their ratio."""
    rows = []
    for task, value in compressed.items():
        before = uncompressed.get(task)
        ratio = f"{value / before:.3f}" if before else "-"
        rows.append({"task": md_escape(task), "value": f"{value:.4f}",
                     "before": f"{before:.4f}" if before is not None else "-", "ratio": ratio})  # fmt: skip
    return rows


def write_compressed_card(folder: Path, record: Mapping[str, Any], *, model_name: str, base_model: Any = None) -> Path:
    """Render the card into ``folder/README.md`` and return its path."""
    from huggingface_hub import ModelCard, ModelCardData

    original, compressed = record["original"], record["compressed"]
    base_id = hub_model_id(base_model) if base_model is not None else None
    lineage = {"base_model": base_id, "base_model_relation": RELATIONS["compressed"]} if base_id else {}
    tag = pipeline_tag(_config(folder))
    data = ModelCardData(library_name="transformers", tags=["hf_sta", "compression", "pruning"],
                         **({"pipeline_tag": tag} if tag else {}), **lineage)  # fmt: skip
    recovery = record.get("recovery")
    context = {
        "title": md_escape(model_name),
        "kept_tasks": [md_escape(t) for t in record["kept_tasks"]],
        "importance": md_prose(record["rule"]["group_score"]),
        "removed": _removed(original, compressed),
        "size": [{"name": k, "original": f"{original[k]:,}", "compressed": f"{compressed[k]:,}"} for k in _WIDTHS],
        "kept_percent": f"{100 * record['kept_fraction']:.1f}%",
        "target": record.get("target"),
        "file_size": _size(record.get("file_size_bytes") or 0),
        "rule": [{"name": md_escape(k), "value": md_prose(v)} for k, v in record["rule"].items()],
        "recovery": {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in recovery.items()}
        if recovery
        else None,
        "accuracy": _accuracy_rows(record.get("accuracy") or {}, record.get("uncompressed_accuracy") or {}),
        "folder": json.dumps(model_name),  # a Python string literal in the code block
    }
    card = ModelCard.from_template(data, template_path=str(template_path("compressed")), **context)
    path = Path(folder) / CARD_NAME
    card.save(path)
    return path


def _config(folder: Path) -> dict | None:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None
