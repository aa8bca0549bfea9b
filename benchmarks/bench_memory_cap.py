"""A merge whose inputs are twice the memory the process may use completes, with the same output.

Issue 18: "a merge whose inputs are larger than the memory the process may use completes (prove it under a memory cap,
e.g. a cgroup, of half the inputs' size)". Setup: a base and three fine-tunes of ``--checkpoint-mb`` MB each (16 fp32
tensors, the fine-tunes the base plus 1% Gaussian noise; safetensors files without a config, so that the merge is
hf_sta's streaming path alone), cached under ``$HF_STA_CACHE/memory_cap/``. Three runs, each in a fresh process:

- ``reference``: ``STAMerger.from_pretrained(base, fine_tunes).merge("ties", density=0.4, output_dir=...)``, no cap;
- ``capped``: the same command under a memory cap of half the inputs' total size;
- ``naive``: the four state dicts read into memory (``safetensors.torch.load`` of each file's bytes, as a tool that
  holds whole models does), then ``theta_0 + sum_t tau_t``, under the same cap (the control: it must be killed, or
  the cap would prove nothing; a memory-mapped ``load_file`` is not a control, its pages are the page cache's).

The cap: a cgroup v1 memory controller group (``memory.limit_in_bytes`` and, when present,
``memory.memsw.limit_in_bytes`` set to the cap; the child joins it before ``exec``) when ``/sys/fs/cgroup/memory`` is
writable, as on this project's machine; else ``RLIMIT_DATA`` (``resource.setrlimit`` in the child), which counts
address space reserved by allocations rather than memory used, and is stricter. Reported: exit status, wall time,
the child's peak RSS (``wait4``), the cgroup's peak usage (``memory.max_usage_in_bytes``: RSS plus the page cache
charged to the group, which the kernel reclaims under the cap), and whether the capped output is byte-identical to the
reference.

``python -m benchmarks.bench_memory_cap`` writes ``benchmarks/results/memory_cap.json``; ``--checkpoint-mb`` sets the
size (default 512: 2.1 GB of inputs, a 1.07 GB cap).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "memory_cap.json"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
TENSORS = 16
HF_STA_MERGE = (
    "import sys\nfrom hf_sta import STAMerger\n"
    "d = sys.argv[1]\n"
    "merger = STAMerger.from_pretrained(d + '/base', {f'ft{i}': d + f'/ft{i}' for i in range(3)})\n"
    "merger.merge('ties', density=0.4, output_dir=sys.argv[2])\n"
)
NAIVE_MERGE = (
    "import sys\nfrom pathlib import Path\nfrom safetensors.torch import load, save_file\n"
    "d = sys.argv[1]\n"
    "base = load(Path(d + '/base/model.safetensors').read_bytes())\n"
    "tunes = [load(Path(d + f'/ft{i}/model.safetensors').read_bytes()) for i in range(3)]\n"
    "save_file({k: v + sum(t[k] - v for t in tunes) for k, v in base.items()}, sys.argv[2] + '.safetensors')\n"
)


def make_inputs(root: Path, checkpoint_mb: int, tensors: int = TENSORS) -> Path:
    """Base + 3 fine-tunes of ``checkpoint_mb`` MB each, in ``tensors`` fp32 tensors, under ``root/<size>`` (reused when
    complete). The merge's working set grows with one tensor's size, its inputs with ``checkpoint_mb``."""
    import torch
    from safetensors.torch import save_file

    folder = root / f"{checkpoint_mb}mb" if tensors == TENSORS else root / f"{checkpoint_mb}mb-{tensors}"
    names = ["base", "ft0", "ft1", "ft2"]
    if all((folder / name / "model.safetensors").is_file() for name in names):
        return folder
    generator = torch.Generator().manual_seed(0)
    numel = checkpoint_mb * 2**20 // 4 // tensors
    base = {f"layers.{i}.weight": torch.randn(numel // 256, 256, generator=generator) for i in range(tensors)}
    for name in names:
        tensors = base if name == "base" else {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}  # fmt: skip
        (folder / name).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / name / "model.safetensors.partial"))
        os.replace(folder / name / "model.safetensors.partial", folder / name / "model.safetensors")
    return folder


def input_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*/model.safetensors"))


def cgroup_available() -> bool:
    """Whether a cgroup v1 memory group can be created here (and removed)."""
    probe = CGROUP_ROOT / f"hf_sta-probe-{os.getpid()}"
    try:
        probe.mkdir()
        (probe / "memory.limit_in_bytes").write_text(str(2**30))
        return True
    except OSError:
        return False
    finally:
        if probe.exists():
            probe.rmdir()


def run_capped(code: str, args: list[str], cap: int | None, how: str) -> dict:
    """Run ``python -c code args`` in a fresh process, under ``cap`` bytes (``how``: "cgroup" or "rlimit")."""
    group = CGROUP_ROOT / f"hf_sta-cap-{os.getpid()}-{time.monotonic_ns()}" if cap and how == "cgroup" else None
    if group is not None:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(cap))

    command = [sys.executable, "-c", code, *args]
    if group is not None:  # a small shell joins the group, then execs: no fork of this (possibly large) process
        command = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"), *command]

    def enter() -> None:  # in the child, before exec (RLIMIT_DATA only: a cgroup is joined by the shell above)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    child = subprocess.Popen(
        command,
        preexec_fn=enter if cap and group is None else None,
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
    )
    stderr = child.stderr.read() if child.stderr else ""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    result = {
        "returncode": child.returncode,
        "wall_s": round(time.perf_counter() - started, 2),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "stderr_tail": stderr.strip().splitlines()[-1:] if child.returncode else [],
    }
    if group is not None:
        result["cgroup_peak_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
        group.rmdir()
    return result


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**24), b""):
            sha.update(chunk)
    return sha.hexdigest()


def prove(folder: Path, work: Path, how: str, log: Callable[[str], None] = print) -> dict:
    """The three runs of the module docstring on the inputs in ``folder``, outputs under ``work``."""
    total = input_bytes(folder)
    cap = total // 2
    log(f"inputs {total / 1e9:.2f} GB, cap {cap / 1e9:.2f} GB ({how})")
    runs = {
        "reference": run_capped(HF_STA_MERGE, [str(folder), str(work / "reference")], None, how),
        "capped": run_capped(HF_STA_MERGE, [str(folder), str(work / "capped")], cap, how),
        "naive": run_capped(NAIVE_MERGE, [str(folder), str(work / "naive")], cap, how),
    }
    for name, run in runs.items():
        log(f"{name}: exit {run['returncode']}, {run['wall_s']} s, peak RSS {run['peak_rss_bytes'] / 1e9:.2f} GB")
    same = runs["capped"]["returncode"] == 0 and digest(work / "reference" / "model.safetensors") == digest(
        work / "capped" / "model.safetensors"
    )
    return {
        "input_bytes": total,
        "cap_bytes": cap,
        "cap_mechanism": how,
        "runs": runs,
        "capped_output_identical": same,
        "target_met": same and runs["naive"]["returncode"] != 0,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-mb", type=int, default=512)
    parser.add_argument("--work", type=Path, default=None, help="where outputs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    import shutil
    import tempfile

    cache = Path(os.environ.get("HF_STA_CACHE", Path.home() / ".cache" / "hf_sta")) / "memory_cap"
    folder = make_inputs(cache, args.checkpoint_mb)
    how = "cgroup" if cgroup_available() else "rlimit"
    work = args.work or Path(tempfile.mkdtemp(prefix="hf_sta-memcap-"))
    try:
        result = prove(folder, work, how)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result.update(
        benchmark="memory_cap",
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine={"cpus": os.cpu_count(), "platform": platform.platform()},
        load_average=os.getloadavg(),
        checkpoint_mb=args.checkpoint_mb,
    )
    print(f"capped output identical to the reference: {result['capped_output_identical']}; naive merge under the cap: "
          f"exit {result['runs']['naive']['returncode']}; target {'met' if result['target_met'] else 'missed'}")  # fmt: skip
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Wrote {RESULTS_PATH}")
    return result


if __name__ == "__main__":
    main()
