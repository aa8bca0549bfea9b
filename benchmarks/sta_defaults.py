"""How STA's defaults were chosen: the ``overlap x density`` cells at scaling 1, on two benchmarks' validation splits.

* MiniLM, six text tasks, seed 0: read from ``results/ablation.json`` (``python -m benchmarks.bench_merging --part
  ablation``), normalised validation accuracy of each cell.
* EfficientNet-Lite0, three image tasks, seed 0 (``benchmarks.bench_vision``'s fine-tunes and protocol): the same cells
  scored here on validation after BatchNorm re-estimation (the way every vision merge is used; the base-statistics
  score is recorded too).

The default is the cell with the best mean of the two normalised accuracies (a cell only one benchmark has is not a
candidate). ``python -m benchmarks.sta_defaults`` prints the table and writes ``results/sta_defaults.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CELLS = [("sum", 0.1), ("sum", 0.2), ("mean", 0.4), ("elect", 0.4), ("elect", 0.7)]


def minilm_cells() -> dict[tuple[str, float], float]:
    ablation = json.loads((RESULTS / "ablation.json").read_text())
    cells = {}
    for row in ablation["results"]["overlap x density"]:
        config = row["config"]
        cells[(config["overlap"], config["density"])] = row["normalized"]
    return cells


def vision_cells(threads: int = 1) -> dict[tuple[str, float], dict[str, float]]:
    from benchmarks.bench_vision import CALIBRATION_SAMPLES, VARIANTS, Benchmark, normalized
    from benchmarks.vision import VisionSuite

    torch.set_num_threads(threads)
    suite = VisionSuite.efficientnet()
    suite.prepare()
    individual = suite.individual("validation")
    bench = Benchmark(suite)
    bench.importance(CALIBRATION_SAMPLES)
    cells = {}
    for overlap, density in CELLS:
        scores = bench.score("validation", "sta", {"overlap": overlap, "density": density})
        cells[(overlap, density)] = {VARIANTS[v]: normalized(s, individual) for v, s in scores.items()}
    return cells


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    minilm, vision = minilm_cells(), vision_cells()
    rows = []
    for cell in CELLS:
        if cell in minilm:
            text, image = minilm[cell], vision[cell]["re-estimated"]
            rows.append(
                {
                    "overlap": cell[0],
                    "density": cell[1],
                    "minilm": text,
                    "vision": image,
                    "vision_base_stats": vision[cell]["base stats"],
                    "mean": (text + image) / 2,
                }
            )
    best = max(rows, key=lambda row: row["mean"])
    print("\n| overlap | density | MiniLM 6 tasks | EfficientNet 3 tasks (BN re-estimated) | mean |")
    print("|---|---|---|---|---|")
    for row in rows:
        mark = "**" if row is best else ""
        print(
            f"| {mark}{row['overlap']}{mark} | {row['density']:g} | {row['minilm']:.3f} | {row['vision']:.3f} | "
            f"{mark}{row['mean']:.3f}{mark} |"
        )
    result = {"split": "validation", "seed": 0, "scaling": 1.0, "rows": rows, "best": best}
    (RESULTS / "sta_defaults.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
