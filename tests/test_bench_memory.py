"""`fedmoe bench memory` on a model small enough for the test suite: the JSON has every
field, the ratios are positive numbers, and nf4 weights are smaller than unquantized."""

from __future__ import annotations

import json
import math

import pytest

from fedmoe.shared.cli import main


@pytest.fixture(scope="module")
def result(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "memory", "--params-m", "1", "--steps", "2", "--warmup-steps", "1", "--seq-len", "16",
               "--batch-size", "2", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "memory.json").read_text())


def test_json_fields(result):
    out, r = result
    assert r["benchmark"] == "memory"
    assert 0.5e6 < r["model"]["parameters"] < 2e6
    assert set(r["modes"]) == {"nf4", "none"}
    for quant, m in r["modes"].items():
        assert m["quant"] == quant
        for key in ("peak_rss_mb", "baseline_rss_mb", "weight_bytes", "tokens_per_second", "tokens", "train_seconds"):
            assert isinstance(m[key], (int, float)) and m[key] > 0, (quant, key, m[key])
        assert m["peak_rss_mb"] >= m["baseline_rss_mb"]
        assert m["peak_rss_mb"] >= m["load_peak_rss_mb"] > 0
        assert m["train_peak_rss_mb"] is None or 0 < m["train_peak_rss_mb"] <= m["peak_rss_mb"]
        assert m["tokens"] == 2 * 2 * 16  # steps x batch x seq-len, every sequence filled
        assert m["trainable_parameters"] > 0
    assert r["modes"]["nf4"]["trainable_parameters"] == r["modes"]["none"]["trainable_parameters"]
    for key in ("peak_rss_nf4_over_none", "weight_bytes_nf4_over_none", "tokens_per_second_nf4_over_none"):
        assert isinstance(r["ratios"][key], float) and math.isfinite(r["ratios"][key]) and r["ratios"][key] > 0, key
    assert (out / "memory.png").stat().st_size > 1000


def test_nf4_weights_are_smaller(result):
    _, r = result
    nf4, none = r["modes"]["nf4"]["weight_bytes"], r["modes"]["none"]["weight_bytes"]
    assert nf4 < none
    assert r["ratios"]["weight_bytes_nf4_over_none"] == pytest.approx(nf4 / none)


def test_child_peak_is_its_own(result):
    _, r = result
    for m in r["modes"].values():
        assert m["peak_rss_above_baseline_mb"] < 300  # a ~1M-parameter model


def test_peak_is_not_inherited_from_the_parent():
    """ru_maxrss carries a parent's peak into a child across fork+exec; the benchmark's
    reading must not, or every mode would report at least its parent's size."""
    import subprocess
    import sys

    ballast = bytearray(400 * 2**20)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])  # touch every page
    code = "from fedmoe.simulations.benchmarks.memory import rss_mb; print(rss_mb()[1])"
    peak = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del ballast
    assert 0 < peak < 200


def test_summary_mentions_both_modes(result):
    from fedmoe.simulations.benchmarks.memory import summary

    text = summary(result[1])
    assert "nf4" in text and "none" in text and "tokens/s" in text
