"""The SAM benchmark and the fine-tuning entry point it shares with users (``benchmarks.finetune``), on a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import bench_sam
from benchmarks.finetune import finetune, finetuned_dir, read_finetune_info

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_adamw_cache_keys_are_the_ones_the_merge_benchmark_recorded():
    """Oracle: the fine-tune folders named in results/merging/seed*.json, written before SAM existed."""
    for seed in (0, 1, 2):
        recorded = json.loads((RESULTS / "merging" / f"seed{seed}.json").read_text())["protocol"]["models"]
        for task, name in recorded.items():
            assert finetuned_dir(task, seed=seed).name == name
            assert finetuned_dir(task, seed=seed, optimizer="adamw").name == name


def test_sam_cache_keys_name_the_optimizer_and_the_resolved_rho():
    adamw = finetuned_dir("news")
    sam = finetuned_dir("news", optimizer="sam")
    assert sam.name.startswith("minilm-news-sam0.05-s0-")
    assert finetuned_dir("news", optimizer="sam", rho=0.05) == sam  # rho=None is the default 0.05
    assert finetuned_dir("news", optimizer="asam").name.startswith("minilm-news-asam0.5-s0-")
    names = {adamw, sam, finetuned_dir("news", optimizer="sam", rho=0.1), finetuned_dir("news", optimizer="asam")}
    assert len(names) == 4


def test_sam_at_rho_zero_is_adamw_bit_for_bit_through_the_benchmark_entry_point(tmp_path):
    """Without dropout, a SAM step at rho 0 takes the same gradient twice: the AdamW fine-tune, bit for bit."""
    base = bench_sam.tiny_bert_base(tmp_path / "base")
    common = dict(seed=0, epochs=1, train_size=24, max_length=32, show_progress=False, base_model=base)
    folders = {
        name: finetune("subjectivity", cache_dir=tmp_path / "cache", optimizer=optimizer, rho=rho, **common)
        for name, optimizer, rho in [("adamw", "adamw", None), ("sam0", "sam", 0.0), ("sam", "sam", 0.5)]
    }
    weights = {name: load_file(folder / "model.safetensors") for name, folder in folders.items()}
    assert len(set(folders.values())) == 3
    assert all(torch.equal(weights["adamw"][k], weights["sam0"][k]) for k in weights["adamw"])
    assert any(not torch.equal(weights["adamw"][k], weights["sam"][k]) for k in weights["adamw"])
    info = read_finetune_info(folders["sam"])
    assert (info["optimizer"], info["rho"], info["steps"]) == ("sam", 0.5, 2) and info["seconds_per_step"] > 0
    assert read_finetune_info(folders["adamw"])["optimizer"] == "adamw"


def test_choose_rho_takes_the_best_criterion_and_breaks_ties_towards_the_default():
    entries = {"sam-0.02": {"criterion": 0.7}, "sam-0.05": {"criterion": 0.8}, "sam-0.1": {"criterion": 0.8},
               "asam-0.2": {"criterion": 0.9}, "asam-0.5": {"criterion": 0.6}, "adamw": {"criterion": 1.0}}  # fmt: skip
    assert bench_sam.choose_rho(entries, "sam") == 0.05
    assert bench_sam.choose_rho(entries, "asam") == 0.2
    with pytest.raises(ValueError, match="no rho"):
        bench_sam.choose_rho({"adamw": {"criterion": 1.0}}, "sam")


def test_split_limit_parses_validation_and_test_counts_and_names_a_bad_item():
    assert bench_sam._split_limit("test=200") == ("test", 200)
    assert bench_sam._split_limit("validation=100") == ("validation", 100)
    for bad in ("train=3", "test=0", "test=x", "test"):
        with pytest.raises(SystemExit, match=f"--split-limit '{bad}'"):
            bench_sam._split_limit(bad)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench_sam")
    result = bench_sam.main(["--part", "all", "--tiny", "--seeds", "0", "--work-dir", str(work), "--methods",
                             "task_arithmetic", "ties", "sta"])  # fmt: skip
    return work, result


def test_tiny_run_records_rho_choice_merges_and_cost(tiny_run):
    work, result = tiny_run
    entries = result["rho"]["entries"]
    assert set(entries) == {"adamw", "sam-0.05", "sam-0.1", "asam-0.5"}
    for optimizer in ("sam", "asam"):
        best = max(e["criterion"] for k, e in entries.items() if k.startswith(f"{optimizer}-"))
        chosen = result["rho"]["chosen"][optimizer]
        assert entries[f"{optimizer}-{chosen:g}"]["criterion"] == best
        assert "sam" in next(iter(entries[f"{optimizer}-{chosen:g}"]["models"].values()))
    for optimizer, runs in result["sets"].items():
        (run,) = runs
        individual = run["individual"]["test"]
        for method in ("task_arithmetic", "ties", "sta"):
            row = run["rows"][method]
            assert row["config"] in bench_sam.MERGE_GRIDS[method]
            assert all(0 <= a <= 1 for a in row["test"].values())
            expected = sum(row["test"][t] / individual[t] for t in individual) / len(individual)
            assert row["normalized"] == pytest.approx(expected)
        folders = [r["folder"] for r in run["fine_tunes"].values()]
        assert all((optimizer in name) == (optimizer != "adamw") for name in folders)
    ratios = result["cost"]["ratios"]
    assert 1.3 < ratios["sam_over_adamw"]["cpu"] < 3.5 and 1.3 < ratios["asam_over_adamw"]["cpu"] < 3.5
    assert (work / "sam.json").is_file() and (work / "results" / "rho.json").is_file()


def test_interference_pairs_equal_the_two_task_arithmetic_merge(tiny_run):
    """Oracle: theta_0 + tau_i + tau_j built by the merger (task arithmetic of the two tasks, scaling 1)."""
    work, result = tiny_run
    run = result["sets"]["sam"][0]
    settings = {**bench_sam.TINY, "base_model": work / "tiny-base", "cache_dir": work / "cache"}
    suite = bench_sam.make_suite(run["protocol"]["tasks"], 0, "sam", run["protocol"]["rho"], settings)
    first, second = suite.tasks[:2]
    body = suite.merger().merge(method="task_arithmetic", tasks=[first, second], scaling=1.0)
    pairs, own = run["interference"]["pairs"], run["interference"]["own"]
    assert suite.loss(body, first, "validation") == pytest.approx(pairs[f"{first}+{second}"], abs=2e-3)
    assert suite.loss(body, second, "validation") == pytest.approx(pairs[f"{second}+{first}"], abs=2e-3)
    increases = [pairs[f"{first}+{o}"] - own[first] for o in suite.tasks if o != first]
    assert run["interference"]["per_task"][first] == pytest.approx(sum(increases) / len(increases))


def test_a_second_merge_run_reuses_every_saved_row(tiny_run):
    work, _ = tiny_run
    saved = {path: path.stat().st_mtime_ns for path in (work / "results").glob("*-s0.json")}
    assert len(saved) == 3
    bench_sam.main(["--part", "merge", "--tiny", "--seeds", "0", "--work-dir", str(work), "--methods", "ties"])
    assert {path: path.stat().st_mtime_ns for path in saved} == saved


def test_table_part_summarises_the_saved_sets_as_the_merge_run_did(tiny_run, capsys):
    """Oracle: the summary the merge run computed from the sets in memory."""
    work, result = tiny_run
    rhos = {o: result["sets"][o][0]["protocol"]["rho"] for o in ("sam", "asam")}
    default_summary = (work / "sam.json").read_text()
    table = bench_sam.main(["--part", "table", "--tiny", "--seeds", "0", "--work-dir", str(work), "--methods",
                            "task_arithmetic", "ties", "sta", "tsv", "--rho-sam", str(rhos["sam"]), "--rho-asam",
                            str(rhos["asam"]), "--summary", str(work / "table.json")])  # fmt: skip
    assert json.loads((work / "table.json").read_text())["summary"] == json.loads(json.dumps(table["summary"]))
    assert (work / "sam.json").read_text() == default_summary  # --summary: the default one is left alone
    for optimizer in ("adamw", "sam", "asam"):
        for method in ("task_arithmetic", "ties", "sta"):
            assert table["summary"][optimizer]["methods"][method] == result["summary"][optimizer]["methods"][method]
        assert table["summary"][optimizer]["methods"]["tsv"] == {}  # no saved row: not summarised
    gap = table["summary"]["sam"]["vs_adamw"]["normalized_gap"]["ties"]
    rows = {o: result["sets"][o][0]["rows"]["ties"]["normalized"] for o in ("adamw", "sam")}
    assert gap["mean"] == pytest.approx(rows["sam"] - rows["adamw"]) and gap["n"] == 1
    assert "| tsv | — | — | — |" in capsys.readouterr().out


def test_rho_part_runs_only_the_grids_of_the_optimizers_asked(tiny_run):
    work, result = tiny_run
    out = bench_sam.main(["--part", "rho", "--tiny", "--seeds", "0", "--work-dir", str(work), "--optimizers", "adamw",
                          "sam"])  # fmt: skip
    assert set(out["rho"]["chosen"]) == {"sam"}
    assert out["rho"]["chosen"]["sam"] == result["rho"]["chosen"]["sam"]  # the saved entries, reused
