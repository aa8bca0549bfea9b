"""Start-up benchmark: how long ``hf-sta --help`` and ``import hf_sta`` take, against the interpreter alone.

Issue 18's target: ``hf-sta --help`` in under 0.5 s on an idle 2-core machine (it took about 6 s when the CLI
imported torch and transformers at start). Each command runs in a fresh process (``subprocess.run``, wall clock from
before the fork to after the exit), ``--repeats`` times, the commands interleaved; medians. For reference, the rows
that must import torch (``merge --help`` lists the methods, whose kernels need it) and the interpreter alone.

``python -m benchmarks.bench_startup`` writes ``benchmarks/results/startup.json``; ``--tiny`` runs the fast commands
once and writes nothing (what the test runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "startup.json"
TARGET_SECONDS = 0.5


def commands() -> dict[str, list[str]]:
    """The timed commands: the console script when it is installed next to this interpreter, else ``-m``."""
    script = Path(sys.executable).with_name("hf-sta")
    cli = [str(script)] if script.is_file() else [sys.executable, "-m", "hf_sta.cli"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import hf_sta": [sys.executable, "-c", "import hf_sta"],
        "hf-sta --help": [*cli, "--help"],
        "hf-sta --version": [*cli, "--version"],
        "hf-sta merge --help": [*cli, "merge", "--help"],
    }


def time_once(command: list[str]) -> float:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    return time.perf_counter() - started


def run(repeats: int, *, tiny: bool = False) -> dict:
    timed = {k: v for k, v in commands().items() if not (tiny and "merge" in k)}
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(repeats):
        for name, command in timed.items():
            samples[name].append(time_once(command))
    rows = {
        name: {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "runs": values}
        for name, values in samples.items()
    }
    return {
        "benchmark": "startup",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average": os.getloadavg(),
        "repeats": repeats,
        "target_s": TARGET_SECONDS,
        "commands": {
            name: " ".join(Path(part).name if part == sys.executable else part for part in command)
            for name, command in timed.items()
        },  # fmt: skip
        "results": rows,
        "target_met": rows["hf-sta --help"]["median_s"] < TARGET_SECONDS,
    }


def table(result: dict) -> str:
    lines = ["| command | median s | min s | max s |", "|---|---|---|---|"]
    for name, row in result["results"].items():
        lines.append(f"| `{name}` | {row['median_s']:.3f} | {row['min_s']:.3f} | {row['max_s']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tiny", action="store_true", help="the fast commands once, nothing written")
    args = parser.parse_args(argv)
    result = run(1 if args.tiny else args.repeats, tiny=args.tiny)
    print(table(result))
    print(f"hf-sta --help: {result['results']['hf-sta --help']['median_s']:.3f} s (target < {TARGET_SECONDS} s: "
          f"{'met' if result['target_met'] else 'missed'}); load average {result['load_average'][0]:.2f}")  # fmt: skip
    if not args.tiny:
        RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_PATH.write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {RESULTS_PATH}")
    return result


if __name__ == "__main__":
    if shutil.which("hf-sta") is None and not Path(sys.executable).with_name("hf-sta").is_file():
        print("note: no hf-sta console script next to this Python; timing `python -m hf_sta.cli`", file=sys.stderr)
    main()
