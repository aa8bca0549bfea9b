"""Importance benchmark: hf_sta's calibration loop versus a plain forward+backward loop over the same batches.

The issue: "Importance over 256 samples of SmolLM2-135M (offline) versus a plain forward+backward loop over the same
batches without accumulation: report the throughput ratio (target >= 0.9) and the extra peak memory (target <= one
fp32 copy of the parameters)."

Setup: SmolLM2-135M-Instruct in fp32 (``benchmarks.smollm.smollm2_path``), 256 samples of real text (BBC News
articles of the offline ``news`` task, ``benchmarks.tasks.load_task``) cut to ``--seq-len`` tokens (64 by default, no
padding), micro-batches of 8, causal-LM loss (``labels = input_ids``), CPU (no accelerator is lent to this machine).
Three loops over the same pre-tokenized batches, in one process, run alternately ``--repeats`` times (median):

- ``plain``: ``loss = model(**batch).loss; loss.backward(); model.zero_grad(set_to_none=True)``;
- ``hf_sta``: ``hf_sta.importance.accumulate_gradient_statistics(model, batches, statistic="abs")``, the loop of
  ``STAMerger.compute_importance`` (per-parameter post-accumulate-grad hooks fold ``|g|`` into fp32 accumulators and
  free each gradient at once);
- ``naive``: the plain loop plus, after each backward, a Python loop ``acc[name] += (p * p.grad).abs()``.

Memory: the process' RSS is sampled every 5 ms in a thread (psutil, else ``/proc/self/statm``); each loop reports its
peak RSS above the RSS measured after the model and the batches were loaded (``malloc_trim`` before every loop, so
memory freed by the previous loop does not count). ``extra`` is a loop's peak minus the plain loop's peak (median of
the per-repetition values); the target is at most one fp32 copy of the parameters (538 MB).

Run ``python -m benchmarks.bench_importance`` (a few minutes on 2 cores); ``--tiny`` runs on a tiny Llama built from a
config in seconds and writes nothing. Results go to ``benchmarks/results/importance.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "importance.json"
TARGET_THROUGHPUT_RATIO = 0.9
LOOPS = ("plain", "hf_sta", "naive")
_MB = 1e6


def current_rss() -> int:
    """Resident set size of this process in bytes (psutil when installed, else ``/proc/self/statm``)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_free_memory() -> None:
    """Give memory freed by earlier loops back to the OS (glibc ``malloc_trim``), so it is not counted twice."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Context manager sampling this process' RSS every ``interval`` seconds in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, current_rss())
            self._done.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = current_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def make_batches(tokenizer: Any, texts: Sequence[str], num_samples: int, seq_len: int, micro_batch_size: int) -> list:
    """``num_samples`` texts of at least ``seq_len`` tokens, cut to exactly ``seq_len`` (no padding), in
    micro-batches ``{"input_ids", "attention_mask", "labels"}``."""
    rows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= seq_len:
            rows.append(ids[:seq_len])
        if len(rows) == num_samples:
            break
    if len(rows) < num_samples:
        raise ValueError(f"Only {len(rows)} texts have >= {seq_len} tokens; {num_samples} needed.")
    batches = []
    for start in range(0, num_samples, micro_batch_size):
        input_ids = torch.tensor(rows[start : start + micro_batch_size])
        batches.append(
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
        )
    return batches


def plain_loop(model: torch.nn.Module, batches: Sequence[dict]) -> float:
    """Forward + backward per micro-batch, gradients freed each step; returns the mean loss."""
    model.eval()
    total = 0.0
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        total += float(loss.detach())
    return total / len(batches)


def naive_loop(model: torch.nn.Module, batches: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The plain loop plus ``acc += (p * p.grad).abs()`` over every parameter after each backward."""
    model.eval()
    parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    accumulators = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters}
    with torch.enable_grad():
        for batch in batches:
            model(**batch).loss.backward()
            with torch.no_grad():
                for name, p in parameters:
                    accumulators[name] += (p * p.grad).abs()
            model.zero_grad(set_to_none=True)
    return accumulators


def hf_sta_loop(model: torch.nn.Module, batches: Sequence[dict]) -> dict[str, torch.Tensor]:
    """``accumulate_gradient_statistics`` (mean ``|g|`` per parameter), as ``STAMerger.compute_importance`` runs it."""
    from accelerate import Accelerator

    from hf_sta.importance import accumulate_gradient_statistics

    statistics_, _, _ = accumulate_gradient_statistics(
        model, batches, statistic="abs", accelerator=Accelerator(cpu=True), show_progress=False
    )
    return statistics_


def load_calibration_module(path: Path) -> Any:
    """Load a (patched) ``hf_sta/importance/calibration.py`` standalone, beside the installed hf_sta (it has no
    relative imports), to time it in the same process as the installed one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"hf_sta_variant_calibration_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variant_loop(module: Any, model: torch.nn.Module, batches: Sequence[dict]) -> dict[str, torch.Tensor]:
    """:func:`hf_sta_loop` with the ``accumulate_gradient_statistics`` of ``module``."""
    from accelerate import Accelerator

    statistics_, *_ = module.accumulate_gradient_statistics(
        model, batches, statistic="abs", accelerator=Accelerator(cpu=True), show_progress=False
    )
    return statistics_


def time_loop(loop: Callable[[], Any]) -> tuple[float, int]:
    """``(seconds, peak RSS in bytes)`` of one call of ``loop``; the result is dropped before returning."""
    release_free_memory()
    with PeakRSS() as peak:
        start = time.perf_counter()
        result = loop()
        seconds = time.perf_counter() - start
    del result
    return seconds, peak.peak


def load_model_and_texts(tiny: bool) -> tuple[torch.nn.Module, Any, list[str], str]:
    """SmolLM2-135M (fp32) and BBC News texts, or a tiny Llama and synthetic texts for ``--tiny``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )

        class CharTokenizer:
            def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
                return {"input_ids": [min(ord(c), 299) for c in text]}

        texts = [f"sample {i} " * 20 for i in range(64)]
        return LlamaForCausalLM(config), CharTokenizer(), texts, "tiny-llama (config)"

    from benchmarks.smollm import smollm2_path
    from benchmarks.tasks import load_task

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = list(load_task("news")["train"]["text"])
    return model, tokenizer, texts, str(path)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-naive", action="store_true", help="skip the naive Python accumulation loop")
    parser.add_argument("--tiny", action="store_true", help="tiny Llama, 16 samples, 1 repetition, nothing saved")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also time the accumulate_gradient_statistics of the calibration.py file at PATH (a patched copy)",
    )
    parser.add_argument("--output", type=Path, default=None, help=f"JSON path (default {RESULTS_PATH})")
    args = parser.parse_args(argv)
    if args.tiny:
        args.num_samples, args.seq_len, args.repeats = 16, 32, 1

    model, tokenizer, texts, model_name = load_model_and_texts(args.tiny)
    batches = make_batches(tokenizer, texts, args.num_samples, args.seq_len, args.micro_batch_size)
    num_parameters = sum(p.numel() for p in model.parameters())
    fp32_copy_bytes = 4 * num_parameters
    mean_loss = plain_loop(model, batches[:1])  # a sanity check of the model (about 3 on real text)
    loops: dict[str, Callable[[Sequence[dict]], Any]] = {
        "plain": lambda data: plain_loop(model, data),
        "hf_sta": lambda data: hf_sta_loop(model, data),
        "naive": lambda data: naive_loop(model, data),
    }
    for item in args.variant:
        name, _, path = item.partition("=")
        module = load_calibration_module(Path(path).resolve())
        loops[name] = lambda data, module=module: variant_loop(module, model, data)
    if args.no_naive:
        loops.pop("naive")
    for loop in loops.values():  # warm-up outside the timings: imports (accelerate), first-call allocations
        loop(batches[:1])
    release_free_memory()
    baseline = current_rss()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in loops}
    load_before = os.getloadavg()
    for repeat in range(args.repeats):
        for name, loop in loops.items():
            load = os.getloadavg()[0]
            seconds, peak = time_loop(lambda loop=loop: loop(batches))
            runs[name].append(
                {"seconds": seconds, "peak_above_baseline_mb": (peak - baseline) / _MB, "load_1min": load}
            )
            print(
                f"[{repeat + 1}/{args.repeats}] {name:7s} {seconds:7.2f} s  {args.num_samples / seconds:6.1f} samples/s"
                f"  peak RSS +{(peak - baseline) / _MB:7.1f} MB  load {load:.2f}",
                flush=True,
            )
    load_after = os.getloadavg()

    plain_seconds = [run["seconds"] for run in runs["plain"]]
    plain_peaks = [run["peak_above_baseline_mb"] for run in runs["plain"]]
    summary: dict[str, dict[str, float]] = {}
    for name, loop_runs in runs.items():
        seconds = statistics.median(run["seconds"] for run in loop_runs)
        ratios = [plain / run["seconds"] for plain, run in zip(plain_seconds, loop_runs)]
        extras = [run["peak_above_baseline_mb"] - plain for plain, run in zip(plain_peaks, loop_runs)]
        summary[name] = {
            "seconds": seconds,
            "samples_per_second": args.num_samples / seconds,
            "throughput_ratio_to_plain": statistics.median(ratios),
            "peak_rss_above_baseline_mb": statistics.median(run["peak_above_baseline_mb"] for run in loop_runs),
            "extra_peak_vs_plain_mb": statistics.median(extras),
        }
    hf_sta = summary["hf_sta"]
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "device": "cpu",
            "load_avg_before": load_before,
            "load_avg_after": load_after,
            "note": "CPU only: no GPU on this machine. 2 shared cores, other jobs running; loops interleaved, medians.",
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "setup": {
            "model": model_name,
            "num_parameters": num_parameters,
            "fp32_copy_mb": fp32_copy_bytes / _MB,
            "data": "synthetic (tiny)" if args.tiny else "benchmarks.tasks.load_task('news') train texts",
            "num_samples": args.num_samples,
            "seq_len": args.seq_len,
            "micro_batch_size": args.micro_batch_size,
            "micro_batches": len(batches),
            "repeats": args.repeats,
            "variants": dict(item.partition("=")[::2] for item in args.variant),
            "baseline_rss_mb": baseline / _MB,
            "warmup_loss": mean_loss,
        },
        "results": summary,
        "runs": runs,
        "targets": {
            "throughput_ratio": hf_sta["throughput_ratio_to_plain"],
            "throughput_ratio_target": TARGET_THROUGHPUT_RATIO,
            "throughput_met": hf_sta["throughput_ratio_to_plain"] >= TARGET_THROUGHPUT_RATIO,
            "extra_peak_mb": hf_sta["extra_peak_vs_plain_mb"],
            "extra_peak_target_mb": fp32_copy_bytes / _MB,
            "memory_met": hf_sta["extra_peak_vs_plain_mb"] <= fp32_copy_bytes / _MB,
        },
    }
    print()
    print(markdown_table(results))
    print()
    print(json.dumps(results["targets"], indent=2))
    output = args.output or (None if args.tiny else RESULTS_PATH)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"Wrote {output}")
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """loop | s | samples/s | throughput ratio | peak RSS above baseline | extra vs plain."""
    setup = results["setup"]
    lines = [
        f"{setup['num_samples']} samples x {setup['seq_len']} tokens, micro-batch {setup['micro_batch_size']}, "
        f"{setup['model']}, CPU ({results['machine']['torch_threads']} threads); one fp32 copy of the parameters = "
        f"{setup['fp32_copy_mb']:.0f} MB",
        "",
        "| loop | s | samples/s | throughput ratio to plain | peak RSS above baseline MB | extra vs plain MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry in results["results"].items():
        lines.append(
            f"| {name} | {entry['seconds']:.2f} | {entry['samples_per_second']:.1f} | "
            f"{entry['throughput_ratio_to_plain']:.3f} | {entry['peak_rss_above_baseline_mb']:.0f} | "
            f"{entry['extra_peak_vs_plain_mb']:+.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
