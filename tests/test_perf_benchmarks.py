"""Smoke tests of `fedmoe bench comm|aggregate|overhead` at tiny sizes (no timed assertions)."""

import argparse
import json

from fedmoe.simulations.benchmarks import aggregate, comm, overhead


def parse(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def test_bench_aggregate_tiny(tmp_path):
    args = parse(aggregate, ["--sites", "3,8", "--layers", "1", "--dim", "64", "--rank", "4", "--qr-max-stack", "16"])
    result = aggregate.run(args)
    got = {(r["method"], r["sites"]) for r in result["rows"]}
    assert got == {("naive", 3), ("krylov", 3), ("stream", 3), ("stream0", 3), ("qr", 3),
                   ("naive", 8), ("krylov", 8), ("stream", 8), ("stream0", 8)}
    assert all(r["seconds"] >= 0 and r["peak_rss_mb"] > 0 for r in result["rows"])
    assert "stream/naive N=8" in result["ratios"] and "krylov/naive N=8" in result["ratios"]
    assert result["stream_memory_growth"]["method"] == "krylov"
    assert result["accuracy"]["stream_error_over_optimal"] >= 1 - 1e-6
    # 3 sites of rank 4 (Σr = 12) fit in the Krylov blocks (2 x 12 columns): exact
    assert abs(result["accuracy"]["krylov_error_over_optimal"] - 1) < 1e-4
    assert abs(result["accuracy"]["qr_error_over_optimal"] - 1) < 1e-6  # the stacked QR is exact
    aggregate.plot(result, tmp_path / "aggregate.png")
    assert (tmp_path / "aggregate.png").stat().st_size > 0
    assert "stream/naive" in aggregate.summary(result) and "krylov" in aggregate.summary(result)
    json.dumps(result, default=str)


def test_bench_comm_wire_sizes(tmp_path):
    result = comm.run(parse(comm, ["--wire-only"]))
    for w in result["wire"]:
        assert w["codecs"]["int8"]["ratio_to_fp32"] <= 0.27
        assert 0.49 <= w["codecs"]["fp16"]["ratio_to_fp32"] <= 0.52
    comm.plot(result, tmp_path / "comm.png")
    assert (tmp_path / "comm.png").stat().st_size > 0 and "int8" in comm.summary(result)


def test_bench_overhead_breakdown_of_a_run(smoke_run, tmp_path):
    report = json.loads((smoke_run / "report.json").read_text())
    result = overhead.breakdown(smoke_run, report["wall_seconds"] + 5.0, "smoke")
    assert result["site_training_seconds"] > 0 and result["ratio_wall_to_training"] > 0
    assert abs(sum(result["parts"].values()) - result["wall_seconds"]) < 1e-6
    overhead.plot(result, tmp_path / "overhead.png")
    assert (tmp_path / "overhead.png").stat().st_size > 0 and "wall/training" in overhead.summary(result)
