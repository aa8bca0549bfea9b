"""Model cards of hf_sta outputs: ``model_cards/{merged,forgotten,adapter}.md`` rendered with ``huggingface_hub``.

:func:`write_model_card` writes ``README.md`` (and ``importance.png`` when importance scores were used) next to the
weights. The card's metadata lists every input model that is a Hub repo in ``base_model`` (the Hub reads a list as a
merge: ``base_model_relation: merge``), ``library_name``, ``tags``, the calibration ``datasets`` and, when given,
``eval_results`` (``model-index``). Its body names the method (pretty name, paper), the inputs and their roles, every
parameter with its documentation from the registry, the fraction of entries kept per layer and task, the importance
per layer, and the command that reproduces the model.

An existing card is updated, not overwritten (as PEFT's ``create_or_update_model_card`` does): its text outside the
``<!-- hf_sta:start -->`` ... ``<!-- hf_sta:end -->`` section is kept and its metadata is merged with the new one.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .layout import CARD_NAME, RECIPE_NAME
from .lineage import BASE_KEY, TARGET_KEY, from_cache_path, valid_repo_id

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCard

    from .importance import ImportanceScores

    # {task: {metric: value}}, or EvalResult objects / dicts of their fields
    EvalResults = Mapping[str, Mapping[str, float]] | Sequence[Mapping[str, Any] | EvalResult]

logger = logging.getLogger(__name__)

__all__ = [
    "SECTION_START",
    "SECTION_END",
    "IMPORTANCE_PLOT",
    "card_kind",
    "group_by_layer",
    "hub_model_id",
    "importance_by_layer",
    "layer_of",
    "layer_sort_key",
    "md_escape",
    "render_model_card",
    "template_path",
    "write_model_card",
]

SECTION_START = "<!-- hf_sta:start -->"
SECTION_END = "<!-- hf_sta:end -->"
IMPORTANCE_PLOT = "importance.png"
OTHER_LAYER = "other"

_TEMPLATES = {
    "merged": "merged.md",
    "forgotten": "forgotten.md",
    "adapter": "adapter.md",
    "compressed": "compressed.md",  # rendered by hf_sta.compression.card
}
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")
# `model.layers.3.mlp.up_proj.weight` -> `model.layers.3`; `encoder.layer.0...` -> `encoder.layer.0`; GPT-2's `h.5`.
_LAYER = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|blocks|block|h)\.(\d+))(?:\.|$)")
_SECTION = re.compile(
    rf"^{re.escape(SECTION_START)}[ \t]*$.*?^{re.escape(SECTION_END)}[ \t]*$(?:\r?\n)?", re.MULTILINE | re.DOTALL
)
# Markdown characters that could start formatting, links, tables or HTML inside a value.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-!|~])")

_COMMON_PARAMETER_DOCS = {
    "scaling": "Global coefficient lambda: theta = theta_0 + lambda * delta.",
    "weights": "Per-task weights w_t applied to the task vectors (default 1 each).",
    "tasks": "The tasks merged (default: every input).",
    "seed": "Seed of random methods; each tensor draws from the seed and its name.",
    "torch_dtype": "Output dtype of floating tensors (default: the base model's).",
    "max_shard_size": "Output shard budget.",
}
_FORGET_PARAMETER_DOCS = {
    "task": "The task forgotten: its task vector tau_f = theta_f - theta_0 is subtracted.",
    "method": "'sta' subtracts only the task's important entries m_f * tau_f; 'negation' the whole task vector.",
    "scaling": "How much of the (selected) task vector is subtracted: theta' = theta - scaling * m_f * tau_f.",
    "target": "The model edited: the base (empty), a loaded task's fine-tuned model, or a checkpoint.",
    "torch_dtype": _COMMON_PARAMETER_DOCS["torch_dtype"],
    "max_shard_size": _COMMON_PARAMETER_DOCS["max_shard_size"],
}
_NEGATION = {
    "pretty_name": "Task-vector negation",
    "paper_title": "Editing Models with Task Arithmetic",
    "paper_url": "https://arxiv.org/abs/2212.04089",
    "description": "Subtract the whole task vector of the forgotten task.",
}
_INPUT_ROLES = {"models": "fine-tuned model", "adapters": "LoRA adapter", "task_vectors": "task vector"}


# -- templates --------------------------------------------------------------------------------------------------------
def template_path(kind: str) -> Path:
    """The Jinja template of a card ``kind`` (``merged``, ``forgotten``, ``adapter``).

    Looked up in the repository's top-level ``model_cards/`` (a source checkout or an editable install), else in the
    ``hf_sta/model_cards/`` package data of an installed wheel.
    """
    if kind not in _TEMPLATES:
        raise ValueError(f"Unknown model card kind {kind!r}; expected one of {', '.join(_TEMPLATES)}.")
    package = Path(__file__).resolve().parent
    for folder in (package.parent / "model_cards", package / "model_cards"):
        candidate = folder / _TEMPLATES[kind]
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Model card template '{_TEMPLATES[kind]}' not found in {package.parent / 'model_cards'} or "
        f"{package / 'model_cards'}: the installation is incomplete."
    )


def card_kind(recipe: Mapping[str, Any]) -> str:
    """``"adapter"`` when the recipe writes a PEFT adapter, ``"forgotten"`` for a ``forget`` recipe, else ``"merged"``."""
    if recipe.get("output_format") == "adapter":
        return "adapter"
    return "forgotten" if "forget" in recipe else "merged"


# -- escaping ---------------------------------------------------------------------------------------------------------
def md_escape(value: Any) -> str:
    """``value`` as inline Markdown text: one line, HTML-escaped, formatting characters (``|``, `````, ``*`` ...)
    backslash-escaped, so task names, paths and repo ids cannot break a table or inject markup."""
    text = " ".join(str(value).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def md_prose(text: Any) -> str:
    """Trusted text (registry docs, paper titles) for a table cell: one line, HTML-escaped, ``|`` escaped."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def md_code_block(text: str, language: str = "") -> str:
    """A fenced code block whose fence is longer than any run of backticks in ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def _format_value(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


# -- sources ----------------------------------------------------------------------------------------------------------
def hub_model_id(source: Any) -> str | None:
    """The Hub repo id of a model ``source``, or ``None`` for local paths and in-memory inputs.

    A path inside the Hub cache (``.../models--org--name/snapshots/<sha>``) gives ``org/name``. Only repo ids go into
    the card's ``base_model`` metadata: the Hub rejects other values there.
    """
    if not isinstance(source, str | os.PathLike) or not str(source).strip():
        return None
    text = str(source).strip()
    cached = from_cache_path(text)
    if cached or Path(text).expanduser().exists():
        return cached
    return valid_repo_id(text)


def _hub_dataset_id(data: Any) -> str | None:
    if not isinstance(data, str) or not data.strip():
        return None
    if data.lower().endswith(_DATA_SUFFIXES) or Path(data).expanduser().exists():
        return None
    return hub_model_id(data)  # same naming rules as model repos


def _source_cell(source: Any, repo_id: str | None = None) -> str:
    """An input as the card's body shows it: a link to its Hub repo when one is known (the recipe's local path
    beside it), else the path as the recipe writes it (relative to the output folder)."""
    repo_id = repo_id or hub_model_id(source)
    if repo_id is not None:
        link = f"[{md_escape(repo_id)}](https://huggingface.co/{repo_id})"
        return link if source in (None, repo_id) else f"{link} (here: {md_escape(source)})"
    return md_escape(source) if source else "(in memory)"


def _recipe_hub_ids(recipe: Mapping[str, Any]) -> dict[str, str]:
    """The repo ids of the recipe's inputs: its ``hub_ids`` and every input written as a repo id."""
    ids = {key: repo for key, repo in (recipe.get("hub_ids") or {}).items() if repo}
    written = {BASE_KEY: recipe.get("base_model"), TARGET_KEY: (recipe.get("forget") or {}).get("target")}
    for group in _INPUT_ROLES:
        written.update(recipe.get(group) or {})
    for key, source in written.items():
        repo = hub_model_id(source) if key not in ids else None
        if repo:
            ids[key] = repo
    return ids


# The Hub's base_model_relation of each kind of output: a merge has its inputs as parents; an adapter output is an
# adapter of the base; a forgetting or a pruned model is the edited model's weights changed, the closest relation
# being "finetune" (the Hub knows adapter, merge, quantized and finetune).
RELATIONS = {"merged": "merge", "adapter": "adapter", "forgotten": "finetune", "compressed": "finetune"}
KIND_TAGS = {"merged": "merge", "forgotten": "forgetting", "compressed": "compression"}


def _lineage_metadata(
    kind: str, forgetting: bool, method: str, lineage: list[str | None], edited: str | None, base: Mapping | None
) -> dict[str, Any]:
    """``tags``, ``library_name``, ``pipeline_tag``, ``base_model`` and ``base_model_relation`` of a card."""
    metadata: dict[str, Any] = {k: v for k, v in (base or {}).items() if k in ("library_name", "pipeline_tag")}
    tags = ["hf_sta", "forgetting" if forgetting else "merge", method]
    if kind == "adapter":
        tags += ["peft", "lora"]
        metadata["library_name"] = "peft"
        parents = [lineage[0]] if lineage[0] else []
    elif forgetting:
        parents = [edited] if edited else []
    else:
        parents = list(dict.fromkeys(repo for repo in lineage if repo))
    metadata.setdefault("library_name", "transformers")
    metadata["tags"] = tags
    if parents:
        relation = RELATIONS["adapter" if kind == "adapter" else "forgotten" if forgetting else "merged"]
        metadata.update(base_model=parents if relation == "merge" else parents[0], base_model_relation=relation)
    return metadata


def default_title(recipe: Mapping[str, Any], method: str) -> str:
    """What the model is: ``news + sentiment (TIES-Merging merge)``, ``merge without news (forgetting, STA)``."""
    forget, merge = recipe.get("forget") or {}, recipe.get("merge") or {}
    tasks = list(merge.get("tasks") or [t for g in _INPUT_ROLES for t in (recipe.get(g) or {})])
    adapter = " as a LoRA adapter" if recipe.get("output_format") == "adapter" else ""
    if forget:
        edited = forget.get("target") or "base model"
        edited = Path(str(edited)).name if not hub_model_id(edited) else edited
        return f"{edited} without {forget.get('task')} (forgetting with {method}{adapter})"
    return f"{' + '.join(tasks)} ({method} merge{adapter})"


# -- statistics -------------------------------------------------------------------------------------------------------
def layer_of(name: str) -> str:
    """The layer a tensor belongs to: ``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``; tensors outside
    numbered blocks (embeddings, final norm, heads) -> ``"other"``."""
    match = _LAYER.match(name)
    return match.group(1) if match else OTHER_LAYER


def layer_sort_key(layer: str) -> tuple:
    if layer == OTHER_LAYER:
        return (1, "", 0)
    prefix, _, index = layer.rpartition(".")
    return (0, prefix, int(index))


def group_by_layer(values: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{tensor: {task: value}}`` -> ``{layer: {task: mean over the layer's tensors}}`` (unweighted), layers in
    model order and ``"other"`` last."""
    sums: dict[str, dict[str, list[float]]] = {}
    for tensor, per_task in values.items():
        bucket = sums.setdefault(layer_of(tensor), {})
        for task, value in per_task.items():
            bucket.setdefault(task, []).append(float(value))
    return {
        layer: {task: sum(items) / len(items) for task, items in sums[layer].items()}
        for layer in sorted(sums, key=layer_sort_key)
    }


def importance_by_layer(importance: Mapping[str, ImportanceScores]) -> dict[str, dict[str, float]]:
    """Mean normalised importance per layer and task: per tensor ``mean(I / max(I))`` (STA's default ``"max"``
    normalisation; an all-zero tensor scores 0), averaged over the layer's tensors. Reads one tensor at a time."""
    per_tensor: dict[str, dict[str, float]] = {}
    for task, scores in importance.items():
        for key in scores.keys():
            tensor = scores[key]
            peak = float(tensor.max()) if tensor.numel() else 0.0
            mean = float(tensor.mean()) / peak if peak > 0 and math.isfinite(peak) else 0.0
            per_tensor.setdefault(key, {})[task] = mean
    return group_by_layer(per_tensor)


def _layer_rows(stats: Mapping[str, Mapping[str, float]], tasks: list[str], percent: bool) -> list[list[str]]:
    rows = []
    for layer, per_task in stats.items():
        cells = [md_escape(layer)]
        for task in tasks:
            value = per_task.get(task)
            if value is None:
                cells.append("")
            else:
                cells.append(f"{100 * value:.1f}%" if percent else f"{value:.3f}")
        rows.append(cells)
    return rows


def plot_importance(stats: Mapping[str, Mapping[str, float]], path: Path, *, title: str) -> Path | None:
    """Write the per-layer importance plot (PNG, matplotlib's Agg canvas, no global backend change); ``None`` when
    matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: the model card has no importance plot (pip install matplotlib).")
        return None
    layers = list(stats)
    tasks = sorted({task for per_task in stats.values() for task in per_task})
    figure = Figure(figsize=(max(6.0, 0.3 * len(layers) + 2.0), 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for task in tasks:
        axes.plot(
            range(len(layers)),
            [stats[layer].get(task, float("nan")) for layer in layers],
            marker="o",
            markersize=3,
            label=task,
        )
    axes.set_xticks(range(len(layers)))
    axes.set_xticklabels(layers, rotation=90, fontsize=7)
    axes.set_ylabel("mean of I / max I")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


# -- rendering --------------------------------------------------------------------------------------------------------
def _method_info(name: str) -> dict[str, Any]:
    if name == "negation":
        return {"name": name, **_NEGATION, "parameters": {}}
    from .methods import get_merge_method

    try:
        spec = get_merge_method(name)
    except ValueError:
        return {
            "name": name,
            "pretty_name": name,
            "paper_title": None,
            "paper_url": None,
            "description": "",
            "parameters": {},
        }
    return {
        "name": spec.name,
        "pretty_name": spec.pretty_name,
        "paper_title": spec.paper_title,
        "paper_url": spec.paper_url,
        "description": spec.description,
        "parameters": {p.name: p for p in spec.parameters},
    }


def _method_context(info: Mapping[str, Any]) -> dict[str, str]:
    title = md_prose(info["paper_title"]) if info.get("paper_title") else ""
    url = info.get("paper_url")
    paper = f"[{title}]({url})" if url and title else (f"*{title}*" if title else "")
    return {
        "name": md_escape(info["name"]),
        "pretty_name": md_prose(info["pretty_name"]),
        "paper": paper,
        "description": md_prose(info.get("description") or ""),
    }


def _parameter_rows(section: Mapping[str, Any], docs: Mapping[str, str], method: Mapping[str, Any]) -> list[dict]:
    rows = []
    for key, doc in docs.items():
        if key in section:
            rows.append(
                {"name": md_escape(key), "value": md_escape(_format_value(section[key])), "doc": md_prose(doc)}
            )
    parameters = method["parameters"]
    params = dict(section.get("params") or {})
    for name, parameter in parameters.items():
        value = params.pop(name, parameter.default)
        doc = parameter.doc + (f" Allowed: {parameter.interval}." if parameter.interval else "")
        if parameter.choices:
            doc += f" One of: {', '.join(map(str, parameter.choices))}."
        rows.append({"name": md_escape(name), "value": md_escape(_format_value(value)), "doc": md_prose(doc)})
    for name, value in params.items():  # parameters the registry does not document (a newer recipe)
        rows.append({"name": md_escape(name), "value": md_escape(_format_value(value)), "doc": ""})
    return rows


def _summary_rows(coefficients: Mapping[str, Sequence[float]], labels: Sequence[str]) -> list[list[str]]:
    """Per direction ``d``: mean, min and max over the groups of ``coefficients[group][d]``."""
    columns = list(zip(*coefficients.values(), strict=True)) if coefficients else []
    rows = []
    for index, values in enumerate(columns):
        label = labels[index] if index < len(labels) else str(index)
        stats = (sum(values) / len(values), min(values), max(values))
        rows.append([md_escape(label), *(f"{v:.3f}" for v in stats)])
    return rows


def learned_context(merge: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a learned merge (``merge.learned``: ``adamerging``, ``dv_basi``) and a ``scaling``/``density="auto"``
    search (``merge.auto``) recorded, for the card: a summary per direction and the search's evaluations."""
    learned, auto = merge.get("learned"), merge.get("auto")
    if not learned and not auto:
        return None
    context: dict[str, Any] = {}
    if learned:
        coefficients = learned.get("coefficients") or {}
        labels = learned.get("basis") or learned.get("tasks") or []
        context["learned"] = {
            "method": md_escape(learned.get("method", "")),
            "granularity": md_escape(learned.get("granularity", "")),
            "num_learnable": learned.get("num_learnable", 0),
            "groups": len(coefficients),
            "examples": md_escape(_format_value(learned.get("examples_used", {}))),
            "rows": _summary_rows(coefficients, labels),
        }
    if auto:
        searched = list(auto.get("searched") or [])
        context["auto"] = {
            "objective": md_escape(auto.get("objective", "")),
            "passes": auto.get("calibration_passes", 0),
            "chosen": md_escape(_format_value(auto.get("chosen", {}))),
            "columns": [md_escape(name) for name in searched],
            "rows": [
                [*(md_escape(_format_value(e.get(name))) for name in searched), f"{e['objective']:.6g}"]
                for e in auto.get("evaluations") or []
            ],
        }
    return context


def _eval_results(items: EvalResults | None, pipeline_tag: str | None = None) -> list[EvalResult] | None:
    """``huggingface_hub.EvalResult`` objects from ``{task: {metric: value}}`` (each task a dataset of that name,
    the model's pipeline tag as the task type) or from ``EvalResult`` objects / dicts of their fields."""
    if not items:
        return None
    from huggingface_hub import EvalResult

    if isinstance(items, Mapping):
        results = []
        for task, metrics in items.items():
            if not isinstance(metrics, Mapping) or not metrics:
                raise ConfigError(f"eval_results.{task}: expected a mapping metric -> value, got {metrics!r}.")
            for metric, value in metrics.items():
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise ConfigError(f"eval_results.{task}.{metric}: expected a finite number, got {value!r}.")
                results.append(EvalResult(
                    task_type=pipeline_tag or "other", task_name=str(task), dataset_type=str(task),
                    dataset_name=str(task), metric_type=str(metric), metric_name=str(metric), metric_value=float(value),
                ))  # fmt: skip
        return results
    results = []
    for index, item in enumerate(items):
        if isinstance(item, EvalResult):
            results.append(item)
            continue
        try:
            results.append(EvalResult(**dict(item)))
        except TypeError as err:
            raise ConfigError(
                f"eval_results[{index}]: {err}; expected the fields of huggingface_hub.EvalResult (task_type, "
                "dataset_type, dataset_name, metric_type, metric_value, ...)."
            ) from err
    return results


def _importance_datasets(recipe: Mapping[str, Any]) -> list[str]:
    """The Hub dataset ids the importance was measured on (``importance.<task>.data``), in order, once each."""
    importance_config = recipe.get("importance") or {}
    datasets = [(c or {}).get("data") for c in importance_config.values() if isinstance(c, Mapping)]
    return list(dict.fromkeys(d for d in map(_hub_dataset_id, datasets) if d))


def render_model_card(
    *,
    recipe: Mapping[str, Any],
    kept_fraction: Mapping[str, Mapping[str, float]] | None = None,
    importance: Mapping[str, ImportanceScores] | None = None,
    importance_layers: Mapping[str, Mapping[str, float]] | None = None,
    eval_results: EvalResults | None = None,
    model_name: str | None = None,
    plot: str | None = None,
    base_metadata: Mapping[str, str] | None = None,
) -> ModelCard:
    """The card of one hf_sta output (not merged with an existing card; see :func:`write_model_card`).

    Args:
        recipe: what the merger writes to ``hf_sta_config.yaml`` (``base_model``, ``models`` / ``adapters`` /
            ``task_vectors``, ``importance``, ``hub_ids``, and a ``merge`` or ``forget`` section; ``output_format:
            adapter``), its paths relative to the output folder.
        kept_fraction: ``{tensor name: {task: fraction of entries kept}}``; shown per layer.
        importance: the importance scores used, per task (metric and calibration size are shown).
        importance_layers: precomputed :func:`importance_by_layer` of ``importance`` (computed here otherwise).
        eval_results: ``{task: {metric: value}}``, or ``huggingface_hub.EvalResult`` objects or dicts of their
            fields (-> ``model-index``, which the Hub renders, and an Evaluation section).
        model_name: the card's title and the ``model-index`` name (default: :func:`default_title`).
        plot: file name of the importance plot to show, if one was written.
        base_metadata: the base's ``library_name`` / ``pipeline_tag`` (``hf_sta.lineage.hub_metadata``).
    """
    from huggingface_hub import ModelCard, ModelCardData

    kind = card_kind(recipe)
    forget = recipe.get("forget") or {}
    merge = recipe.get("merge") or {}
    section = forget if kind == "forgotten" or (kind == "adapter" and forget) else merge
    method_name, method, docs = _card_method(section, section is forget)
    base_model = recipe.get("base_model")
    ids = _recipe_hub_ids(recipe)
    inputs, lineage = _card_inputs(recipe, section, section is forget, ids)
    target = forget.get("target") if section is forget else None
    all_tasks = {t for group in _INPUT_ROLES for t in (recipe.get(group) or {})}
    if target and target not in all_tasks:
        inputs.append({"role": "edited model", "task": "", "source": _source_cell(target, ids.get(TARGET_KEY))})
    if not target:
        edited, edited_id = "the base model", ids.get(BASE_KEY)
    elif target in all_tasks:
        edited, edited_id = f"the fine-tuned model of task {md_escape(target)}", ids.get(target)
    else:
        edited, edited_id = _source_cell(target, ids.get(TARGET_KEY)), ids.get(TARGET_KEY)
    data_config = _lineage_metadata(kind, section is forget, method_name, lineage, edited_id, base_metadata)

    datasets = _importance_datasets(recipe)
    if datasets:
        data_config["datasets"] = datasets
    if model_name is None:
        model_name = default_title(recipe, method.get("pretty_name") or method_name)
    results = _eval_results(eval_results, data_config.get("pipeline_tag"))
    if results:
        data_config.update(eval_results=results, model_name=model_name)
    card_data = ModelCardData(**data_config)

    context: dict[str, Any] = {
        "title": md_escape(model_name),
        "kind": kind,
        "method": _method_context(method),
        "inputs": inputs,
        "parameters": _parameter_rows(section, docs, method),
        "base": _source_cell(base_model, ids.get(BASE_KEY)),
        # a Python string literal for code blocks: repo ids cannot hold backticks or quotes
        "base_literal": json.dumps(ids.get(BASE_KEY) or "BASE_MODEL"),
        "num_tasks": len(inputs) - 1 - (1 if target and target not in all_tasks else 0),
        "forget_task": md_escape(forget.get("task", "")),
        "edited": edited,
        "adapter_options": [
            {"name": md_escape(k), "value": md_escape(_format_value(v))}
            for k, v in (recipe.get("adapter") or {}).items()
        ],
        "adapter_error": _adapter_error(recipe.get("adapter") or {}),
        "command": f"hf-sta {'forget' if section is forget else 'merge'} {RECIPE_NAME} --output-dir reproduced",
        "software": software_versions(),
        "learned": learned_context(merge) if section is merge else None,
    }
    context.update(
        _statistics_context(kept_fraction, importance, importance_layers, recipe.get("importance") or {}, plot)
    )
    if results:
        context["evaluation"] = _evaluation_rows(results)
    recipe_text = _yaml_dump(recipe)
    context["recipe"] = md_code_block(recipe_text, "yaml")
    return ModelCard.from_template(card_data, template_path=str(template_path(kind)), **context)


def _card_method(section: Mapping[str, Any], forgetting: bool) -> tuple[str, dict[str, Any], Mapping[str, str]]:
    """``(method name, its card info, the parameter docs)`` of the recipe's merge or forget section."""
    method_name = str(section.get("method") or ("sta" if forgetting else "task_arithmetic"))
    method = _method_info(method_name)
    if not forgetting:
        return method_name, method, _COMMON_PARAMETER_DOCS
    if method_name == "negation":
        method = {**method, "parameters": {}}
    else:  # forgetting selects with STA's masks; `overlap` is a merge option
        method = {**method, "parameters": {k: v for k, v in method["parameters"].items() if k != "overlap"}}
    return method_name, method, _FORGET_PARAMETER_DOCS


def _card_inputs(
    recipe: Mapping[str, Any], section: Mapping[str, Any], forgetting: bool, ids: Mapping[str, str]
) -> tuple[list[dict[str, str]], list[str | None]]:
    """The card's input rows (base, then every merged or edited task with its role) and their Hub ids (lineage)."""
    inputs = [{"role": "base model", "task": "", "source": _source_cell(recipe.get("base_model"), ids.get(BASE_KEY))}]
    lineage: list[str | None] = [ids.get(BASE_KEY)]
    merged_tasks = None if forgetting else section.get("tasks")
    weights = None if forgetting else section.get("weights")
    for group, role in _INPUT_ROLES.items():
        for task, source in (recipe.get(group) or {}).items():
            if merged_tasks and task not in merged_tasks:
                continue
            role_text = role
            if isinstance(weights, Mapping) and task in weights:
                role_text = f"{role} (weight {_format_value(weights[task])})"
            if forgetting and task == section.get("task"):
                role_text = f"{role}, forgotten"
            cell = _source_cell(source, ids.get(task))
            inputs.append({"role": md_escape(role_text), "task": md_escape(task), "source": cell})
            lineage.append(ids.get(task))
    return inputs, lineage


def _statistics_context(kept_fraction, importance, importance_layers, importance_config, plot) -> dict[str, Any]:
    """The card's per-layer tables: entries kept per task, and the importance each task puts on each layer."""
    context: dict[str, Any] = {}
    if kept_fraction:
        stats = group_by_layer(kept_fraction)
        tasks = list(dict.fromkeys(t for per_task in stats.values() for t in per_task))
        context["kept"] = {"tasks": [md_escape(t) for t in tasks], "rows": _layer_rows(stats, tasks, percent=True)}
    if importance:
        layers = importance_layers if importance_layers is not None else importance_by_layer(importance)
        tasks = list(importance)
        context["importance"] = {
            "tasks": [md_escape(t) for t in tasks],
            "rows": _layer_rows(layers, tasks, percent=False),
            "plot": plot,
            "summary": [
                {
                    "task": md_escape(task),
                    "metric": md_escape(scores.metric),
                    "samples": scores.num_samples,
                    "data": _data_cell(importance_config.get(task), scores),
                }
                for task, scores in importance.items()
            ],
        }
    return context


def _evaluation_rows(results: list) -> list[dict[str, str]]:
    """The Evaluation section's rows, one per ``EvalResult``."""
    return [
        {
            "task": md_escape(r.task_name or r.task_type),
            "dataset": md_escape(r.dataset_name) + (f" ({md_escape(r.dataset_split)})" if r.dataset_split else ""),
            "metric": md_escape(r.metric_name or r.metric_type),
            "value": md_escape(_format_value(r.metric_value)),
        }
        for r in results
    ]


def _adapter_error(adapter: Mapping[str, Any]) -> dict[str, Any] | None:
    """The reconstruction error an adapter output recorded, for the card (``None`` when none was recorded)."""
    from .io.adapters import ADAPTER_ERROR_WARNING

    mean, peak = adapter.get("relative_error_mean"), adapter.get("relative_error_max")
    if not isinstance(mean, int | float) or not isinstance(peak, int | float):
        return None
    return {
        "mean": f"{100 * mean:.1f}%",
        "max": f"{100 * peak:.1f}%",
        "warn": mean > ADAPTER_ERROR_WARNING,
        "threshold": f"{100 * ADAPTER_ERROR_WARNING:.0f}%",
    }


_SOFTWARE = ("hf-sta", "torch", "transformers", "peft", "safetensors", "huggingface_hub", "accelerate")


def software_versions() -> str:
    """``hf-sta 0.1.0, torch 2.13.0, ...``: the versions of the libraries that made the output."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in _SOFTWARE:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(parts)


def _data_cell(config: Any, scores: ImportanceScores) -> str:
    parts = []
    if isinstance(config, Mapping) and config.get("data"):
        data = str(config["data"])
        dataset_id = _hub_dataset_id(data)
        split = config.get("split")
        if dataset_id:
            parts.append(f"[{md_escape(dataset_id)}](https://huggingface.co/datasets/{dataset_id})")
        else:
            parts.append(md_escape(Path(data).name))
        if split and dataset_id:
            parts.append(f"split {md_escape(split)}")
    elif isinstance(config, Mapping) and config.get("path"):
        parts.append(f"from {md_escape(Path(str(config['path'])).name)}")
    if scores.dataset_fingerprint:
        parts.append(f"fingerprint {md_escape(scores.dataset_fingerprint)}")
    if scores.metric == "magnitude":
        parts.append("no data (|tau|)")
    return ", ".join(parts) or "not recorded"


def _yaml_dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(_plain(data), sort_keys=False, allow_unicode=True)


def _plain(value: Any) -> Any:
    """Recipes may hold paths, tuples or dataclass-like values: make them YAML-safe."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


# -- update an existing card ------------------------------------------------------------------------------------------
# Metadata keys hf_sta owns: the new card's value replaces the existing one's (``base_model_relation`` goes with
# ``base_model``); ``tags`` and ``datasets`` become unions; every other key of the existing card is kept.
_OWNED_METADATA = ("base_model", "base_model_relation", "library_name", "pipeline_tag")


def _section(text: str) -> str:
    match = _SECTION.search(text)
    if match is None:  # a template without markers: the whole body is hf_sta's
        return f"{SECTION_START}\n{text.strip()}\n{SECTION_END}\n"
    return match.group(0) if match.group(0).endswith("\n") else match.group(0) + "\n"


def update_card(existing: ModelCard, new: ModelCard) -> ModelCard:
    """``existing`` with its hf_sta section replaced by ``new``'s (appended when it has none) and its metadata
    updated through ``ModelCard.data`` (see ``_OWNED_METADATA``; ``model-index`` is replaced when ``new`` has
    evaluation results). ``existing`` is modified and returned."""
    section = _section(new.text)
    text = existing.text
    if _SECTION.search(text):
        text = _SECTION.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + section
    existing.text = text if text.startswith("\n") else "\n" + text
    data, update = existing.data, new.data
    for key in ("tags", "datasets"):
        old = getattr(data, key, None) or []
        merged = list(dict.fromkeys([*([old] if isinstance(old, str) else old), *(getattr(update, key, None) or [])]))
        setattr(data, key, merged or None)
    if getattr(update, "base_model", None) is not None:
        data.base_model = update.base_model
        data.base_model_relation = getattr(update, "base_model_relation", None)
    for key in _OWNED_METADATA[2:]:
        if getattr(update, key, None) is not None:
            setattr(data, key, getattr(update, key))
    if getattr(update, "eval_results", None):
        data.eval_results, data.model_name = update.eval_results, update.model_name
    return existing


def write_model_card(
    folder: str | os.PathLike,
    *,
    recipe: Mapping[str, Any],
    kept_fraction: Mapping[str, Mapping[str, float]] | None = None,
    importance: Mapping[str, ImportanceScores] | None = None,
    eval_results: EvalResults | None = None,
    existing_card: str | os.PathLike | None = None,
    model_name: str | None = None,
    base_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``folder/README.md`` for an hf_sta output, and ``folder/importance.png`` when ``importance`` is given
    (and matplotlib is installed). Returns the card's path.

    Args:
        folder: the output folder (weights already written).
        recipe: the recipe written to ``hf_sta_config.yaml`` (see :func:`render_model_card`).
        kept_fraction: ``{tensor: {task: fraction kept}}`` of an STA merge (``STAMerger.last_kept_fraction``).
        importance: ``{task: ImportanceScores}`` used by the merge or forgetting; omit when none was used.
        eval_results: evaluation results for the ``model-index`` metadata and an Evaluation section.
        existing_card: a card to update (default: ``folder/README.md`` when it exists). Its text outside the
            ``<!-- hf_sta:start -->`` / ``<!-- hf_sta:end -->`` section and its other metadata are kept.
        model_name: title and ``model-index`` name (default: the existing card's ``model_name``, else what the
            model is: :func:`default_title`).
        base_metadata: the base's ``library_name`` / ``pipeline_tag`` (see :func:`render_model_card`).
    """
    from huggingface_hub import ModelCard

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing_path = Path(existing_card) if existing_card is not None else folder / CARD_NAME
    if existing_card is not None and not existing_path.is_file():
        raise FileNotFoundError(f"Existing model card '{existing_path}' does not exist.")
    existing = ModelCard.load(existing_path, ignore_metadata_errors=True) if existing_path.is_file() else None
    if model_name is None and existing is not None:
        model_name = existing.data.model_name

    plot = None
    layers = None
    if importance:
        layers = importance_by_layer(importance)
        metrics = sorted({scores.metric for scores in importance.values()})
        samples = ", ".join(f"{task}: {scores.num_samples}" for task, scores in importance.items())
        title = f"Mean normalised importance per layer ({', '.join(metrics)}; samples {samples})"
        written = plot_importance(layers, folder / IMPORTANCE_PLOT, title=title)
        plot = IMPORTANCE_PLOT if written else None
    card = render_model_card(
        recipe=recipe,
        kept_fraction=kept_fraction,
        importance=importance,
        importance_layers=layers,
        eval_results=eval_results,
        model_name=model_name,
        plot=plot,
        base_metadata=base_metadata,
    )
    if existing is not None:
        card = update_card(existing, card)
    path = folder / CARD_NAME
    card.save(path)
    return path
