"""`fedmoe bench quality`: mean ± sd per method over seeds and paired differences, with
differences inside the noise marked unresolved."""

from __future__ import annotations

import pytest

from fedmoe.simulations.benchmarks.quality import paired, summarize, summary


def report(oracle: float, local: float, gate: float, conflict: float = 0.5) -> dict:
    methods = {"experts_oracle": oracle, "local_only": local, "moe_arrow": gate, "moe_learned": gate - 0.1}
    return {"preset": "smoke", "metric": "acc_norm", "bench_seconds": 10.0,
            "methods": {m: {"mixed": v, "conflict": conflict, "per_domain": {"law": v, "medicine": v}}
                        for m, v in methods.items()}}


def test_paired_differences_and_their_noise():
    assert paired([0.5, 0.6, 0.7], [0.4, 0.5, 0.6]) == pytest.approx({"mean": 0.1, "sd": 0.0, "n": 3, "resolved": True})
    noisy = paired([0.5, 0.4, 0.6], [0.45, 0.5, 0.5])  # +0.05, -0.1, +0.1: inside the noise
    assert noisy["resolved"] is False and noisy["sd"] > 0
    assert paired([0.9], [0.1])["resolved"] is False  # one seed resolves nothing


def test_summary_has_the_documented_shape():
    reports = [report(0.8, 0.5, 0.78), report(0.7, 0.45, 0.69), report(0.75, 0.5, 0.74)]
    naive = [report(0.7, 0, 0), report(0.72, 0, 0), report(0.7, 0, 0)]
    int8 = [report(0.8, 0, 0), report(0.71, 0, 0), report(0.74, 0, 0)]
    out = summarize([0, 1, 2], reports, {"naive": naive, "int8": int8})
    assert out["seeds"] == [0, 1, 2]
    m = out["methods"]["experts_oracle"]
    assert m["mixed"]["mean"] == pytest.approx(0.75) and m["mixed"]["sd"] == pytest.approx(0.05)
    assert m["conflict"]["mean"] == pytest.approx(0.5) and set(m["per_domain"]) == {"law", "medicine"}
    p = out["paired"]
    assert p["experts_vs_local_only"]["mean"] == pytest.approx((0.3 + 0.25 + 0.25) / 3)
    assert p["gate_vs_oracle"]["gate"] == "moe_arrow" and p["gate_vs_oracle"]["mean"] == pytest.approx(-0.0133, abs=1e-3)
    assert p["exact_vs_naive"]["mean"] == pytest.approx((0.1 - 0.02 + 0.05) / 3)
    assert p["int8_vs_fp32"]["mean"] == pytest.approx(0.0) and p["int8_vs_fp32"]["resolved"] is False
    assert "exact_vs_naive_loss" not in p  # these reports carry no loss
    for runs, losses in ((reports, (1.0, 0.9, 0.8)), (naive, (0.9, 0.85, 0.7)), (int8, (1.1, 0.9, 0.85))):
        for r, loss in zip(runs, losses):
            r["methods"]["experts_oracle"]["loss"] = loss
    p = summarize([0, 1, 2], reports, {"naive": naive, "int8": int8})["paired"]
    assert p["exact_vs_naive_loss"]["mean"] == pytest.approx(0.25 / 3) and p["exact_vs_naive_loss"]["resolved"] is True
    assert p["int8_vs_fp32_loss"]["mean"] == pytest.approx(0.15 / 3)  # int8 minus fp32


def test_gate_against_the_best_static_merge_and_summary_from_kept_runs(tmp_path):
    import json

    from fedmoe.shared.errors import FedmoeError
    from fedmoe.simulations.benchmarks.quality import from_runs

    reports = [report(0.8, 0.5, 0.78), report(0.7, 0.45, 0.69)]
    for r, merge in zip(reports, (0.4, 0.3)):
        r["methods"]["static_cat"] = {"mixed": merge, "conflict": 0.2, "per_domain": {"law": merge, "medicine": merge}}
        r["methods"]["static_svd"] = {"mixed": merge - 0.1, "conflict": 0.1, "per_domain": {"law": 0, "medicine": 0}}
    out = summarize([0, 1], reports, {})
    p = out["paired"]["gate_vs_best_static"]
    assert (p["gate"], p["merge"]) == ("moe_arrow", "static_cat") and p["mean"] == pytest.approx((0.38 + 0.39) / 2)
    assert out["paired"]["gate_vs_best_static_conflict"]["mean"] == pytest.approx(0.3)
    for r in reports:  # a merge that is worse on the mixed set but better on conflict is the conflict bar
        r["methods"]["static_svd"]["conflict"] = 0.45
        r["methods"]["moe_arrow"]["routing_accuracy"] = 0.9
        r["methods"]["moe_learned"]["routing_accuracy"] = 1.0
    out = summarize([0, 1], reports, {})
    c = out["paired"]["gate_vs_best_static_conflict"]
    assert c["merge"] == "static_svd" and c["mean"] == pytest.approx(0.05)
    assert out["methods"]["moe_arrow"]["routing"] == pytest.approx({"mean": 0.9, "sd": 0.0, "n": 2})
    assert "routing" not in out["methods"]["experts_oracle"]
    targets = {t["target"]: t for t in out["targets"]}
    assert targets["experts_oracle - local_only >= +5 points"]["met"] is True
    assert targets["best gate's routing accuracy >= 95%"] | {} == {"target": "best gate's routing accuracy >= 95%",
                                                                  "measured": pytest.approx(0.9), "threshold": 0.95, "met": False}
    ratio = targets["best gate >= 99% of experts_oracle (mixed)"]
    assert ratio["measured"] == pytest.approx(0.735 / 0.75) and ratio["met"] is False
    assert targets["best gate - best static merge >= +5 points (conflict)"]["met"] is True
    text = summary(out)
    assert "| moe_arrow | 0.735 | 0.735 | **0.735 ± 0.064** | 0.500 ± 0.000 | 0.900 ± 0.000 |" in text
    assert "MISSED best gate's routing accuracy >= 95%" in text and "[moe_arrow vs static_svd]" in text
    for seed, r in enumerate(reports):  # a --keep-runs folder, one seed still running (no report.json)
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "report.json").write_text(json.dumps(r | {"wall_seconds": 100.0 + seed}))
    (tmp_path / "seed2").mkdir()
    again = from_runs(tmp_path)
    assert again["seeds"] == [0, 1] and again["methods"]["experts_oracle"] == out["methods"]["experts_oracle"]
    assert again["seconds_per_seed"]["mean"] == pytest.approx(100.5)
    with pytest.raises(FedmoeError, match="no seedN/report.json"):
        from_runs(tmp_path / "seed2")
