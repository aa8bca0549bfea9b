"""Merge I/O benchmark: hf_sta's streamed merges beside the I/O floor and mergekit, each in its own process.

Setup (the issue's): 3 fine-tune stand-ins of SmolLM2-135M (``benchmarks.smollm.perturbed_copies``: base + Gaussian
noise, single-file fp32 safetensors of 538 MB) merged into the base, to disk, with ``task_arithmetic``, ``ties``
(density 0.2) and ``dare_ties`` (density 0.5), weights 1 and scaling 1. Every measured configuration runs in a fresh
subprocess, repetition after repetition interleaved (``--repeats``, median reported), each right after the inputs
were read once more, so that it finds them in the page cache (on the benchmark VM pages of the inputs are dropped
between runs: with a cold page cache a run reads from disk at ~100 MB/s). For each run:

- ``seconds``: time of the merge inside the child (opening the inputs, reading, computing, writing the output folder;
  imports excluded on every side, so a CLI's start-up does not count against it), and ``process seconds``, the
  subprocess' wall time including interpreter start-up and imports;
- ``peak RSS``: the child's ``ru_maxrss`` (from ``os.wait4``), which counts the file pages it mapped (safetensors'
  ``safe_open`` and mergekit read through ``mmap``; hf_sta's reader and the I/O floor copy with plain reads), and
  ``peak anon``: the largest anonymous RSS sampled from ``/proc/<pid>/status`` every 10 ms.

Reference rows, all in the same run:

- ``io_floor``: read every input tensor once with plain buffered reads (``readinto`` at the offsets of the
  safetensors header, into fresh tensors), keep the base's, write them with ``safetensors.torch.save_file``; no math.
  This is the floor every method is compared with (``ratio``).
- ``io_floor_safe_open``: the same through ``safetensors.safe_open(...).get_tensor`` (which returns views of a memory
  map since safetensors 0.6, materialised here with ``clone``): what reading with safetensors' own reader costs.
- ``plain_task_arithmetic``: buffered reads, ``theta_0 + sum_t (theta_t - theta_0)``, ``save_file``.
- ``peft_ties`` (``--with-peft``): PEFT's ``merge_utils.ties`` applied tensor by tensor, same I/O as the floor.
- ``mergekit_<method>``: ``mergekit.merge.run_merge`` (mergekit in its own venv, ``benchmarks/.venv-mergekit``:
  ``python3 -m venv benchmarks/.venv-mergekit && benchmarks/.venv-mergekit/bin/pip install torch==2.13.0 &&
  benchmarks/.venv-mergekit/bin/pip install mergekit``) on CPU with the same densities and weights
  (``normalize: true`` for ``dare_ties``, i.e. the disjoint mean of TIES as in PEFT and hf_sta; no tokenizer copy,
  no model card).

Once, outside the timed runs, the outputs are compared: hf_sta's ``task_arithmetic`` with mergekit's (max abs
difference), and ``ties`` (entries that differ by more than ``1e-6`` must all lie where some task's ``|tau_t|``
equals its top-k cut-off, i.e. where tie-breaking decides; mergekit breaks ties by ``argsort`` order, hf_sta by
lowest flat index).

Run ``python -m benchmarks.bench_merge_io`` (about 10 minutes on 2 cores); ``--tiny`` runs every configuration once
on a tiny Llama built from a config, in seconds, without writing ``benchmarks/results``. Results go to
``benchmarks/results/merge_io.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_VENV = REPO_ROOT / "benchmarks" / ".venv-mergekit"
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "merge_io.json"
WEIGHTS_NAME = "model.safetensors"
METHODS: dict[str, dict[str, float]] = {
    "task_arithmetic": {},
    "ties": {"density": 0.2},
    "dare_ties": {"density": 0.5},
    # the data-free methods of issue 13, at their defaults (hf_sta only: mergekit has none of them)
    "tsv": {},
    "iso_c": {},
    "iso_cts": {},
    "cart": {},
    "wudi": {},
}
DEFAULT_METHODS = ("task_arithmetic", "ties", "dare_ties")
MERGEKIT_METHODS = frozenset(DEFAULT_METHODS)
TARGET_RATIO = 1.5
TARGET_TIES_SPEEDUP = 5.0
TARGET_RSS_GB = 1.5
SEED = 0
_GB = 1e9


# ----------------------------------------------------------------------------------------------------------------------
# Child side: one workload per process. Module-level imports are stdlib only, so that the mergekit venv (which does not
# have hf_sta installed) can run this module too.
# ----------------------------------------------------------------------------------------------------------------------


def safetensors_layout(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """``(data_start, {name: header entry})`` of a safetensors file, from its JSON header only."""
    with open(path, "rb") as handle:
        (header_length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_length))
    header.pop("__metadata__", None)
    return 8 + header_length, header


def buffered_tensors(paths: Sequence[Path]) -> Iterator[tuple[str, list[Any]]]:
    """Yield ``(name, [tensor of each file])`` in the first file's order, each read with ``readinto`` into a fresh
    tensor (no memory map: the bytes are copied from the page cache once)."""
    import torch

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    layouts = [safetensors_layout(path) for path in paths]
    handles = [open(path, "rb", buffering=0) for path in paths]  # noqa: SIM115 - closed below
    try:
        names = sorted(layouts[0][1], key=lambda name: layouts[0][1][name]["data_offsets"][0])
        for name in names:
            tensors = []
            for handle, (start, header) in zip(handles, layouts):
                entry = header[name]
                tensor = torch.empty(entry["shape"], dtype=dtypes[entry["dtype"]])
                begin, end = entry["data_offsets"]
                handle.seek(start + begin)
                view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                if handle.readinto(view) != end - begin:
                    raise OSError(f"Short read of '{name}' in {handle.name}")
                tensors.append(tensor)
            yield name, tensors
    finally:
        for handle in handles:
            handle.close()


def safe_open_tensors(paths: Sequence[Path]) -> Iterator[tuple[str, list[Any]]]:
    """Like :func:`buffered_tensors` through ``safe_open(...).get_tensor`` (a view of a memory map), cloned."""
    from safetensors import safe_open

    handles = [safe_open(path, framework="pt") for path in paths]
    for name in handles[0].keys():
        yield name, [handle.get_tensor(name).clone() for handle in handles]


def _save(tensors: dict[str, Any], out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})


def work_io_floor(inputs: Sequence[Path], out: Path, reader: str = "buffered") -> None:
    """Read every input tensor once and write the base's tensors with ``save_file``: no math."""
    read = buffered_tensors if reader == "buffered" else safe_open_tensors
    output = {}
    for name, tensors in read([path / WEIGHTS_NAME for path in inputs]):
        output[name] = tensors[0]
    _save(output, out)


def work_plain_task_arithmetic(inputs: Sequence[Path], out: Path) -> None:
    """``theta_0 + sum_t (theta_t - theta_0)`` tensor by tensor: the plain loop anyone would write."""
    output = {}
    for name, (base, *finetuned) in buffered_tensors([path / WEIGHTS_NAME for path in inputs]):
        merged = base.clone()
        for tensor in finetuned:
            merged += tensor - base
        output[name] = merged
    _save(output, out)


def work_peft_ties(inputs: Sequence[Path], out: Path, density: float) -> None:
    """PEFT's ``merge_utils.ties`` over ``[theta_t - theta_0]`` tensor by tensor (its ``topk`` trim dominates)."""
    import torch
    from peft.utils.merge_utils import ties

    output = {}
    for name, (base, *finetuned) in buffered_tensors([path / WEIGHTS_NAME for path in inputs]):
        deltas = [tensor - base for tensor in finetuned]
        output[name] = base + ties(deltas, torch.ones(len(deltas)), density, "total")
    _save(output, out)


def work_hf_sta(inputs: Sequence[Path], out: Path, method: str, params: dict[str, float]) -> None:
    """``STAMerger.from_pretrained(base, fine-tuned).merge(method, output_dir=out, **params)``."""
    from hf_sta import STAMerger

    finetuned = {f"ft{index}": path for index, path in enumerate(inputs[1:])}
    STAMerger.from_pretrained(inputs[0], finetuned).merge(method=method, output_dir=out, seed=SEED, **params)


def work_mergekit(config_path: Path, out: Path) -> None:
    """``mergekit.merge.run_merge`` on CPU, as ``mergekit-yaml CONFIG OUT --no-copy-tokenizer`` would."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(config_path.read_text()))
    options = MergeOptions(
        copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=True, random_seed=SEED
    )
    run_merge(config, str(out), options=options)


def _preload(kind: str) -> None:
    """Import outside the timed region what the workload imports (every side gets its imports for free)."""
    if kind == "mergekit":
        import mergekit.merge  # noqa: F401
        import mergekit.options  # noqa: F401
        import yaml  # noqa: F401
    else:
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401

        if kind == "hf_sta":
            import transformers

            import hf_sta  # noqa: F401

            # hf_sta reads `base_model_prefix` from the transformers class: import the modeling module now.
            getattr(transformers, "LlamaModel", None)
        if kind == "peft_ties":
            import peft.utils.merge_utils  # noqa: F401


def child_main(args: argparse.Namespace) -> None:
    """Run one workload in this process and print one JSON line with its time."""
    inputs = [Path(p) for p in args.inputs]
    out = Path(args.out)
    if args.hf_sta_path:  # a patched copy of hf_sta shadows the checkout (the cwd comes first on sys.path)
        sys.path.insert(0, args.hf_sta_path)
    _preload(args.child)
    start = time.perf_counter()
    if args.child in ("io_floor", "io_floor_safe_open"):
        work_io_floor(inputs, out, "buffered" if args.child == "io_floor" else "safe_open")
    elif args.child == "plain_task_arithmetic":
        work_plain_task_arithmetic(inputs, out)
    elif args.child == "peft_ties":
        work_peft_ties(inputs, out, METHODS["ties"]["density"])
    elif args.child == "hf_sta":
        work_hf_sta(inputs, out, args.method, METHODS[args.method])
    elif args.child == "mergekit":
        work_mergekit(Path(args.mergekit_config), out)
    else:
        raise ValueError(f"unknown workload {args.child!r}")
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result: dict[str, Any] = {"seconds": seconds, "self_maxrss_kb": usage.ru_maxrss}
    if "hf_sta" in sys.modules:
        result["hf_sta_file"] = sys.modules["hf_sta"].__file__
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Parent side
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Configuration:
    """One measured configuration: a child command line and how to label it."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    runs: list[dict[str, float]] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(run[key] for run in self.runs)


def _proc_status_kb(pid: int, field_name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run_child(command: list[str], env: dict[str, str], out: Path) -> dict[str, float]:
    """Run ``command`` (which must print a JSON line with ``seconds``), sampling its anonymous RSS; return the
    measurements. Peak RSS comes from ``os.wait4`` (``ru_maxrss`` of that child alone)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    stdout = tempfile.TemporaryFile(mode="w+")
    stderr = tempfile.TemporaryFile(mode="w+")
    start = time.perf_counter()
    process = subprocess.Popen(
        [*command, "--out", str(out)], cwd=REPO_ROOT, env=full_env, stdout=stdout, stderr=stderr
    )
    peak_anon_kb = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon_kb
        while not done.is_set():
            value = _proc_status_kb(process.pid, "RssAnon")
            if value is not None:
                peak_anon_kb = max(peak_anon_kb, value)
            done.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    stdout.seek(0)
    stderr.seek(0)
    output, errors = stdout.read(), stderr.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{errors[-4000:]}")
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(command)} printed no result:\n{output[-2000:]}\n{errors[-2000:]}")
    result = json.loads(lines[-1])
    measured = {
        "seconds": result["seconds"],
        "process_seconds": wall,
        "peak_rss_gb": usage.ru_maxrss * 1024 / _GB,
        "peak_anon_gb": peak_anon_kb * 1024 / _GB,
    }
    if "hf_sta_file" in result:
        measured["hf_sta_file"] = result["hf_sta_file"]
    return measured


def warm_page_cache(paths: Sequence[Path]) -> float:
    """Read every file once (1 MiB chunks) so that the timed runs find it in the page cache; returns seconds."""
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.read(1 << 20):
                pass
    return time.perf_counter() - start


def mergekit_config(method: str, inputs: Sequence[Path], folder: Path) -> Path:
    """A mergekit YAML for ``method`` with the densities of :data:`METHODS`, weight 1 per model, fp32."""
    import yaml

    models = []
    for path in inputs[1:]:
        parameters: dict[str, float] = {"weight": 1.0}
        if "density" in METHODS[method]:
            parameters["density"] = METHODS[method]["density"]
        models.append({"model": str(path), "parameters": parameters})
    config: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(inputs[0]),
        "models": models,
        "dtype": "float32",
        "out_dtype": "float32",
    }
    if method == "dare_ties":
        config["parameters"] = {"normalize": True}  # the disjoint mean of TIES, as PEFT and hf_sta compute it
    path = folder / f"mergekit-{method}.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build_configurations(
    inputs: Sequence[Path],
    work: Path,
    *,
    with_mergekit: bool,
    with_peft: bool,
    with_safe_open_floor: bool,
    hf_sta_variants: dict[str, Path | None],
    methods: Sequence[str] = DEFAULT_METHODS,
) -> list[Configuration]:
    """The child command lines, in the interleaving order of one repetition."""
    module = ["-m", "benchmarks.bench_merge_io", "--inputs", *map(str, inputs)]
    python = [sys.executable, *module]
    configurations = [Configuration("io_floor", [*python, "--child", "io_floor"])]
    if with_safe_open_floor:
        configurations.append(Configuration("io_floor_safe_open", [*python, "--child", "io_floor_safe_open"]))
    configurations.append(Configuration("plain_task_arithmetic", [*python, "--child", "plain_task_arithmetic"]))
    for method in methods:
        for variant, path in hf_sta_variants.items():
            name = f"hf_sta_{method}" if variant == "hf_sta" else f"{variant}_{method}"
            command = [*python, "--child", "hf_sta", "--method", method]
            if path is not None:
                command += ["--hf-sta-path", str(path)]
            configurations.append(Configuration(name, command))
        if with_mergekit and method in MERGEKIT_METHODS:
            config = mergekit_config(method, inputs, work)
            command = [str(MERGEKIT_VENV / "bin" / "python"), *module, "--child", "mergekit"]
            configurations.append(Configuration(f"mergekit_{method}", [*command, "--mergekit-config", str(config)]))
    if with_peft:
        configurations.append(Configuration("peft_ties", [*python, "--child", "peft_ties"]))
    return configurations


# ----------------------------------------------------------------------------------------------------------------------
# Numerical agreement with mergekit (once, outside the timed runs)
# ----------------------------------------------------------------------------------------------------------------------


def compare_outputs(inputs: Sequence[Path], outputs: dict[str, Path], atol: float = 1e-6) -> dict[str, Any]:
    """Compare hf_sta's and mergekit's task_arithmetic and ties outputs tensor by tensor."""
    import torch
    from safetensors import safe_open

    report: dict[str, Any] = {"atol": atol}
    sources = [safe_open(path / WEIGHTS_NAME, framework="pt") for path in inputs]
    for method in ("task_arithmetic", "ties"):
        ours, theirs = outputs.get(f"hf_sta_{method}"), outputs.get(f"mergekit_{method}")
        if ours is None or theirs is None:
            continue
        mine = safe_open(ours / WEIGHTS_NAME, framework="pt")
        other = safe_open(next(theirs.glob("*.safetensors")), framework="pt")
        common = sorted(set(mine.keys()) & set(other.keys()))
        summary = {
            "tensors_compared": len(common),
            "only_hf_sta": sorted(set(mine.keys()) - set(other.keys())),
            "only_mergekit": sorted(set(other.keys()) - set(mine.keys())),
            "max_abs_diff": 0.0,
            "entries": 0,
            "entries_differing": 0,
        }
        if method == "ties":
            summary["entries_differing_away_from_cutoff"] = 0
            summary["max_abs_diff_away_from_cutoff"] = 0.0
        for name in common:
            a, b = mine.get_tensor(name).float(), other.get_tensor(name).float()
            difference = (a - b).abs()
            summary["max_abs_diff"] = max(summary["max_abs_diff"], float(difference.max()))
            summary["entries"] += a.numel()
            differing = difference > atol
            summary["entries_differing"] += int(differing.sum())
            if method == "ties":
                base = sources[0].get_tensor(name).float()
                at_cutoff = torch.zeros_like(differing)
                numel = base.numel()
                k = max(1, int(METHODS["ties"]["density"] * numel))  # mergekit keeps >= 1 entry
                for source in sources[1:]:
                    magnitude = (source.get_tensor(name).float() - base).abs().reshape(-1)
                    cutoff = torch.kthvalue(magnitude, numel - k + 1).values
                    at_cutoff |= (magnitude == cutoff).view(a.shape)
                away = differing & ~at_cutoff
                summary["entries_differing_away_from_cutoff"] += int(away.sum())
                if bool(away.any()):
                    summary["max_abs_diff_away_from_cutoff"] = max(
                        summary["max_abs_diff_away_from_cutoff"], float(difference[away].max())
                    )
        report[method] = summary
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarize(configurations: Sequence[Configuration]) -> dict[str, dict[str, Any]]:
    """Medians and raw runs of every configuration."""
    summary = {}
    for configuration in configurations:
        if not configuration.runs:
            continue
        summary[configuration.name] = {
            "seconds": configuration.median("seconds"),
            "process_seconds": configuration.median("process_seconds"),
            "peak_rss_gb": configuration.median("peak_rss_gb"),
            "peak_anon_gb": configuration.median("peak_anon_gb"),
            "runs": configuration.runs,
        }
    return summary


def table_rows(summary: dict[str, dict[str, Any]], variant: str = "hf_sta") -> list[dict[str, Any]]:
    """One row per method: the variant's time and RSS, ratio to the I/O floor, mergekit's, and the speedup."""
    floor = summary["io_floor"]["seconds"]
    rows = []
    for method in METHODS:
        ours = summary.get(f"{variant}_{method}")
        theirs = summary.get(f"mergekit_{method}")
        if ours is None:
            continue
        rows.append(
            {
                "method": method,
                "hf_sta_s": ours["seconds"],
                "hf_sta_rss_gb": ours["peak_rss_gb"],
                "hf_sta_anon_gb": ours["peak_anon_gb"],
                "ratio_to_io_floor": ours["seconds"] / floor,
                "mergekit_s": theirs["seconds"] if theirs else None,
                "mergekit_rss_gb": theirs["peak_rss_gb"] if theirs else None,
                "speedup": theirs["seconds"] / ours["seconds"] if theirs else None,
            }
        )
    return rows


def markdown_table(summary: dict[str, dict[str, Any]], variant: str = "hf_sta") -> str:
    """The issue's table (method | hf_sta s | hf_sta RSS GB | ratio | mergekit s | mergekit RSS | speedup) plus the
    reference rows."""
    label = "hf_sta" if variant == "hf_sta" else variant
    lines = [
        f"| method | {label} s | {label} RSS GB (anon) | ratio to I/O floor | mergekit s | mergekit RSS GB | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table_rows(summary, variant):
        lines.append(
            f"| {row['method']} | {_fmt(row['hf_sta_s'])} | {_fmt(row['hf_sta_rss_gb'])} ({_fmt(row['hf_sta_anon_gb'])})"
            f" | {_fmt(row['ratio_to_io_floor'])} | {_fmt(row['mergekit_s'])} | {_fmt(row['mergekit_rss_gb'])}"
            f" | {_fmt(row['speedup'], 1)}x |".replace("| -x |", "| - |")
        )
    floor = summary["io_floor"]["seconds"]
    for name in ("io_floor", "io_floor_safe_open", "plain_task_arithmetic", "peft_ties"):
        if name in summary:
            entry = summary[name]
            lines.append(
                f"| *{name}* | {_fmt(entry['seconds'])} | {_fmt(entry['peak_rss_gb'])} ({_fmt(entry['peak_anon_gb'])})"
                f" | {_fmt(entry['seconds'] / floor)} | | | |"
            )
    return "\n".join(lines)


def check_targets(summary: dict[str, dict[str, Any]], variant: str = "hf_sta") -> dict[str, Any]:
    """The issue's targets: every method within 1.5x of the floor, ties >= 5x faster than mergekit's, RSS < 1.5 GB."""
    rows = table_rows(summary, variant)
    ties = next((row for row in rows if row["method"] == "ties"), None)
    return {
        "ratio_to_io_floor_max": max(row["ratio_to_io_floor"] for row in rows),
        "ratio_target": TARGET_RATIO,
        "ratio_met": all(row["ratio_to_io_floor"] <= TARGET_RATIO for row in rows),
        "ties_speedup": ties["speedup"] if ties else None,
        "ties_speedup_target": TARGET_TIES_SPEEDUP,
        "ties_speedup_met": bool(ties and ties["speedup"] and ties["speedup"] >= TARGET_TIES_SPEEDUP),
        "peak_rss_gb_max": max(row["hf_sta_rss_gb"] for row in rows),
        "rss_target_gb": TARGET_RSS_GB,
        "rss_met": all(row["hf_sta_rss_gb"] < TARGET_RSS_GB for row in rows),
    }


def _versions() -> dict[str, str | None]:
    import safetensors
    import torch

    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
    }
    import transformers

    versions["transformers"] = transformers.__version__
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "hf_sta"], cwd=REPO_ROOT, capture_output=True, text=True)
    # Of the checkout; a --variant hf_sta=PATH run times the copy at PATH instead (see setup.hf_sta_variants).
    versions["checkout_commit"] = revision.stdout.strip() or None
    versions["checkout_hf_sta_uncommitted_changes"] = bool(dirty.stdout.strip())
    pip = MERGEKIT_VENV / "bin" / "python"
    if pip.exists():
        query = "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"
        result = subprocess.run([str(pip), "-c", query], capture_output=True, text=True)
        if result.returncode == 0:
            mergekit, mergekit_torch = result.stdout.split()
            versions["mergekit"], versions["mergekit_torch"] = mergekit, mergekit_torch
    return versions


def tiny_inputs(folder: Path) -> list[Path]:
    """A tiny Llama (from a config, random weights) and 3 perturbed copies, for ``--tiny`` smoke runs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.smollm import perturbed_copies

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    base = folder / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(base)
    return [base, *perturbed_copies(3, base=base, cache_dir=folder)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of every configuration (median)")
    parser.add_argument("--tiny", action="store_true", help="one repetition on a tiny Llama, results not saved")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit even if its venv exists")
    parser.add_argument("--with-peft", action="store_true", help="also time PEFT's merge_utils.ties per tensor")
    parser.add_argument("--no-safe-open-floor", action="store_true", help="skip the safe_open I/O floor row")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(DEFAULT_METHODS),
        help=f"merge methods to time (default {' '.join(DEFAULT_METHODS)}; mergekit only for those)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also time the hf_sta package found in folder PATH (first on sys.path), e.g. a patched copy",
    )
    parser.add_argument("--output", type=Path, default=None, help=f"JSON path (default {RESULTS_PATH})")
    parser.add_argument("--work-dir", type=Path, default=None, help="where outputs are written (default: cache)")
    # child mode
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--mergekit-config", help=argparse.SUPPRESS)
    parser.add_argument("--hf-sta-path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return {}

    from benchmarks.tasks import cache_root

    variants: dict[str, Path | None] = {"hf_sta": None}
    for item in args.variant:
        name, _, path = item.partition("=")
        variants[name] = Path(path).resolve()
    temporary = None
    if args.tiny:
        temporary = Path(tempfile.mkdtemp(prefix="hf_sta-bench-tiny-"))
        inputs = tiny_inputs(temporary)
        repeats, work_root = 1, temporary
    else:
        from benchmarks.smollm import perturbed_copies, smollm2_path

        inputs = [smollm2_path(), *perturbed_copies(3)]
        repeats = args.repeats
        work_root = args.work_dir or cache_root() / "bench"
    work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="merge-io-", dir=work_root))
    with_mergekit = not args.no_mergekit and (MERGEKIT_VENV / "bin" / "python").exists()
    try:
        configurations = build_configurations(
            inputs,
            work,
            with_mergekit=with_mergekit,
            with_peft=args.with_peft,
            with_safe_open_floor=not args.no_safe_open_floor,
            hf_sta_variants=variants,
            methods=args.methods,
        )
        versions = _versions()  # before the runs: the checkout may change while they go on
        load_before = os.getloadavg()
        warm_seconds = warm_page_cache([path / WEIGHTS_NAME for path in inputs])
        kept: dict[str, Path] = {}
        for repeat in range(repeats):
            for configuration in configurations:
                warm_page_cache([path / WEIGHTS_NAME for path in inputs])
                out = work / f"{configuration.name}-{repeat}"
                load = os.getloadavg()[0]
                run = run_child(configuration.command, configuration.env, out)
                run["load_1min"] = load
                configuration.runs.append(run)
                print(
                    f"[{repeat + 1}/{repeats}] {configuration.name:32s} {run['seconds']:7.2f} s "
                    f"(process {run['process_seconds']:6.2f} s)  RSS {run['peak_rss_gb']:.2f} GB  "
                    f"anon {run['peak_anon_gb']:.2f} GB  load {load:.2f}",
                    flush=True,
                )
                keep = repeat == 0 and configuration.name.startswith(("hf_sta_", "mergekit_"))
                if keep and configuration.name.removeprefix("hf_sta_").removeprefix("mergekit_") != "dare_ties":
                    kept[configuration.name] = out
                else:
                    shutil.rmtree(out, ignore_errors=True)
                    os.sync()  # flush (or drop) the output's dirty pages before the next run
        load_after = os.getloadavg()
        numerical = compare_outputs(inputs, kept) if with_mergekit else {}
        summary = summarize(configurations)
        results: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "load_avg_before": load_before,
                "load_avg_after": load_after,
                "note": "2 shared cores: other jobs ran at the same time; runs are interleaved, medians reported",
            },
            "versions": versions,
            "setup": {
                "inputs": [str(path) for path in inputs],
                "input_bytes": [(path / WEIGHTS_NAME).stat().st_size for path in inputs],
                "methods": {method: METHODS[method] for method in args.methods},
                "weights": 1.0,
                "scaling": 1.0,
                "repeats": repeats,
                "page_cache_warm_read_s": warm_seconds,
                "tiny": args.tiny,
                "hf_sta_variants": {name: str(path) if path else "checkout" for name, path in variants.items()},
            },
            "results": summary,
            "table": table_rows(summary),
            "targets": check_targets(summary),
            "numerical_check": numerical,
        }
        for variant in variants:
            if variant != "hf_sta":
                results[f"table_{variant}"] = table_rows(summary, variant)
                results[f"targets_{variant}"] = check_targets(summary, variant)
        print()
        print(markdown_table(summary))
        for variant in variants:
            if variant != "hf_sta":
                print()
                print(markdown_table(summary, variant))
        print()
        print(json.dumps({"targets": results["targets"], "numerical_check": numerical}, indent=2))
        output = args.output or (None if args.tiny else RESULTS_PATH)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(results, indent=2) + "\n")
            print(f"Wrote {output}")
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
