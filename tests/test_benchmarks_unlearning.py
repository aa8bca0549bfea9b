"""``benchmarks/bench_unlearning.py --tiny``: both parts end to end on tiny BERTs, with the properties the tables rest
on (exactness of the sum-merge subtraction, retraining == re-merging, reversible adapters, rule choices)."""

from __future__ import annotations

import math

from benchmarks import bench_unlearning


def test_bench_unlearning_tiny():
    out = bench_unlearning.main(["--tiny", "--num-threads", "1", "--forget-tasks", "tweet_sentiment",
                                 "--sites", "tweet_sentiment"])  # fmt: skip
    (result,) = out["tasks"]["results"]
    rows = result["rows"]
    assert list(rows) == ["unedited merge", "sta / largest_drop", "sta / closest_to_chance", "negation / largest_drop",
                          "negation / closest_to_chance", "fused", "remerge without task"]  # fmt: skip
    for name, row in rows.items():
        assert 0.0 <= row["target"] <= 1.0 and 0.0 <= row["mia_auc"] <= 1.0, name
        assert math.isclose(row["gap"], row["target"] - row["chance"])
    for method in ("sta", "negation"):
        row = rows[f"{method} / closest_to_chance"]
        evaluated = {p["scaling"] for p in row["curve"]["points"]} | {0.0}
        assert row["scaling"] in evaluated
        if row["scaling"] > 0:  # a chosen edit keeps >= 98% of the validation controls
            point = next(p for p in row["curve"]["points"] if p["scaling"] == row["scaling"])
            assert point["control"] >= 0.98 * row["curve"]["baseline"]["control"]
    fused = rows["fused"]
    assert fused["reversible"] is True and fused["layers"] and 0 < fused["trainable_parameters"]
    assert fused["trainable_parameters"] < 0.05 * fused["target_parameters"]
    summary = out["tasks"]["summary"]
    assert summary["tasks_met"] == int(any(row["meets_target"] for n, row in rows.items() if n != "unedited merge"))

    (site,) = out["federated"]["results"]
    assert site["sum_merge"]["max_abs_difference"] < 1e-5 * site["sum_merge"]["largest_weight"]
    assert out["federated"]["retrain_is_remerge"]["bitwise_equal"] is True
    rows = site["rows"]
    retrain, remerge = rows["retrain (remaining sites)"], rows["remerge without site"]
    for key in ("forget_accuracy", "retain_accuracy", "mia_auc"):
        assert retrain[key] == remerge[key]  # the same weights
    assert rows["fused"]["reversible"] is True and rows["fused"]["trainable"] < 0.05 * retrain["trainable"]
