"""The leave-one-suite-out choice of STA's defaults (``benchmarks.sta_defaults``), the further suites' readers
(``benchmarks.suites``) and the selection statistics, each against an independent computation."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from benchmarks import suites
from benchmarks.sta_defaults import TINY_SUITES, leave_one_out, main, worst_case_choice
from benchmarks.suite_merging import cell_key, selection_stats
from benchmarks.tasks import TASKS, label_names, load_task
from hf_sta import STAMerger


def test_worst_case_choice_maximises_the_minimum_not_the_mean():
    validation = {
        "a": {("elect", 0.7, 1.0): 0.90, ("sum", 0.1, 1.0): 0.99, ("elect", 0.4, 1.0): 0.85},
        "b": {("elect", 0.7, 1.0): 0.80, ("sum", 0.1, 1.0): 0.60, ("elect", 0.4, 1.0): 0.85},
        "c": {("elect", 0.7, 1.0): 0.70, ("sum", 0.1, 1.0): 0.95, ("elect", 0.4, 1.0): 0.95},
    }
    # the best mean over all three is ("sum", 0.1) (0.847); the best worst case is ("elect", 0.4) (0.85)
    assert worst_case_choice(validation, ["a", "b", "c"]) == (("elect", 0.4, 1.0), 0.85)
    folds = leave_one_out(validation)
    for held_out, fold in folds.items():  # oracle: brute force over the cells, first cell wins ties
        others = [s for s in validation if s != held_out]
        worst = {cell: min(validation[s][cell] for s in others) for cell in validation["a"]}
        best = max(worst.values())
        assert fold["cell"] == next(cell for cell in validation["a"] if worst[cell] == best)
        assert fold["chosen_on"] == others and fold["worst_validation"] == best
    assert folds["b"]["cell"] == ("sum", 0.1, 1.0)  # a and c alone prefer sum
    tied = {"a": {("x", 1.0, 1.0): 0.5, ("y", 1.0, 1.0): 0.5}}
    assert worst_case_choice(tied, ["a"])[0] == ("x", 1.0, 1.0)


def test_fortune_and_wordnet_readers(tmp_path, monkeypatch):
    fortunes = tmp_path / "fortunes"
    for language in ("de", "es", "it"):
        (fortunes / language).mkdir(parents=True)
        (fortunes / language / f"{language}cookies").write_text(f"{language} one\n%\n{language}  two\n  words\n%\n")
        (fortunes / language / f"{language}cookies.dat").write_bytes(b"")
    (fortunes / "es" / "off").mkdir()  # the offensive section is not read
    for name in suites.FORTUNE_ENGLISH[:2]:
        (fortunes / name).write_bytes(f"{name} is\tfun\n%\nover_\x08strike\n%\n%\n".encode("latin-1"))
    monkeypatch.setattr(suites, "FORTUNE_DIR", fortunes)
    suites._read_fortunes.cache_clear()
    records = suites.read_extra_records("fortune_language")
    first, second = suites.FORTUNE_ENGLISH[:2]
    assert records == (
        (f"{first} is fun", 0), ("overstrike", 0), (f"{second} is fun", 0), ("overstrike", 0),
        ("de one", 1), ("de two words", 1), ("es one", 2), ("es two words", 2), ("it one", 3), ("it two words", 3),
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y fortunes"):
        suites.read_extra_records("fortune_topic")
    suites._read_fortunes.cache_clear()

    wordnet = tmp_path / "wordnet"
    wordnet.mkdir()
    header = "  1 This software and database is being provided\n"
    (wordnet / "data.noun").write_text(
        header + '00001 05 n 01 dog 0 000 | a domesticated canid; "the dog barked"\n'
        "00002 13 n 01 bread 0 000 | food made from dough\n00003 07 n 01 size 0 000 | physical magnitude\n"
    )
    (wordnet / "data.verb").write_text(header + "00004 38 v 01 run 0 000 | move fast by using one's feet\n")
    (wordnet / "data.adj").write_text("00005 00 a 01 big 0 000 | above average in size\n")
    (wordnet / "data.adv").write_text("00006 02 r 01 well 0 000 | in a good way\n")
    monkeypatch.setattr(suites, "WORDNET_DIR", wordnet)
    suites._read_wordnet.cache_clear()
    assert suites.read_extra_records("wordnet_noun") == (("a domesticated canid", 0), ("food made from dough", 2))
    assert suites.read_extra_records("wordnet_verb") == (("move fast by using one's feet", 3),)
    assert [label for _, label in suites.read_extra_records("wordnet_pos")] == [0, 0, 0, 1, 2, 3]
    suites._read_wordnet.cache_clear()


def test_suites_registry():
    assert suites.SUITES["text6"] == TASKS
    assert suites.suite_of("wordnet_verb") == "wordnet" and suites.suite_of("news") == "text6"
    with pytest.raises(ValueError, match="in no suite"):
        suites.suite_of("nope")
    assert label_names("fortune_language") == ["English", "German", "Spanish", "Italian"]


@pytest.mark.skipif(not suites.WORDNET_DIR.is_dir(), reason="Debian's wordnet-base is not installed")
def test_balanced_wordnet_split():
    splits = load_task("wordnet_verb")
    assert {name: len(split) for name, split in splits.items()} == {"train": 600, "validation": 200, "test": 400}
    counts = [splits["test"]["label"].count(label) for label in range(5)]
    assert counts == [80] * 5  # balanced pool -> stratified splits are balanced
    texts = [set(split["text"]) for split in splits.values()]
    assert all(not a & b for a, b in itertools.combinations(texts, 2))


def test_selection_stats_against_brute_force():
    generator = torch.Generator().manual_seed(0)
    taus = {t: {"w": torch.randn(6, 5, generator=generator), "b": torch.randn(7, generator=generator)} for t in "xy"}
    merger = STAMerger.from_pretrained({"w": torch.zeros(6, 5), "b": torch.zeros(7)}, taus)
    for task in "xy":
        merger.compute_importance(task, metric="magnitude")
    stats = selection_stats(merger, ["x", "y"], 0.4)
    masks = {t: {k: torch.zeros(v.numel(), dtype=torch.bool) for k, v in taus[t].items()} for t in "xy"}
    for t, k in itertools.product("xy", ("w", "b")):  # magnitude importance: top-k |tau| per tensor
        masks[t][k][taus[t][k].abs().flatten().topk(int(0.4 * taus[t][k].numel())).indices] = True
    for t in "xy":
        kept = sum(float((taus[t][k].flatten()[masks[t][k]] ** 2).sum()) for k in ("w", "b"))
        total = sum(float((taus[t][k] ** 2).sum()) for k in ("w", "b"))
        assert stats["kept_energy"][t] == pytest.approx(kept / total, rel=1e-6)
        elected = 0.0
        for k in ("w", "b"):
            weighted = {s: taus[s][k].flatten() * masks[s][k] for s in "xy"}
            sign = torch.where(weighted["x"] + weighted["y"] >= 0, 1.0, -1.0)
            elected += float((weighted[t][weighted[t] * sign > 0] ** 2).sum())
        assert stats["elected_energy"][t] == pytest.approx(elected / total, rel=1e-6)
    both = sum(int((masks["x"][k] & masks["y"][k]).sum()) for k in ("w", "b"))
    either = sum(int((masks["x"][k] | masks["y"][k]).sum()) for k in ("w", "b"))
    assert stats["jaccard"]["x|y"] == pytest.approx(both / either)
    assert stats["jaccard_independent"] == pytest.approx(0.16 / 0.64)


@pytest.mark.slow
def test_tiny_run_reports_each_suite_with_a_choice_made_without_it(tmp_path):
    output = tmp_path / "out.json"
    result = main(["--tiny", "--work-dir", str(tmp_path / "work"), "--output", str(output)])
    saved = json.loads(output.read_text())
    assert output.with_suffix(".png").stat().st_size > 0
    assert set(saved["suites"]) == set(TINY_SUITES) == set(saved["folds"])
    validation = {name: {(r["overlap"], r["density"], r["scaling"]): r["normalized"] for r in rows}
                  for name, rows in saved["validation"].items()}  # fmt: skip
    for held_out, fold in saved["folds"].items():
        others = [s for s in validation if s != held_out]
        worst = {cell: min(validation[s][cell] for s in others) for cell in validation[held_out]}
        chosen = (fold["cell"]["overlap"], fold["cell"]["density"], fold["cell"]["scaling"])
        assert worst[chosen] == max(worst.values()) and held_out not in fold["chosen_on"]
        rows = saved["suites"][held_out]["rows"]
        assert rows["sta_loso"]["params"] == fold["cell"]
        # the reported test score is the cached score of that cell, recomputed here from its per-task accuracies
        cache = json.loads((tmp_path / "work" / f"{held_out}.json").read_text())["rows"]
        params = {"overlap": chosen[0], "density": chosen[1]}
        cached = cache[cell_key("sta", params, chosen[2], "test")]["scores"]
        individual = saved["suites"][held_out]["individual"]["test"]
        assert rows["sta_loso"]["test"] == pytest.approx(sum(cached[t] / individual[t] for t in cached) / len(cached))
        for key in ("task_arithmetic_auto", "ties_auto", "sta_auto"):
            assert rows[key]["calibration_passes"] == 6
        assert rows["sta_auto_density"]["calibration_passes"] == 9
        ta_validation = {s: cache[cell_key("task_arithmetic", {}, s, "validation")]["normalized"] for s in (0.5, 1.0)}
        assert rows["task_arithmetic_tuned"]["params"]["scaling"] == max(ta_validation, key=ta_validation.get)
    assert result["targets"].keys() == set(TINY_SUITES)
