"""`fedmoe bench scale`: its input checks, its memory sampler, and its JSON on a tiny run."""

import argparse
import json
import subprocess
import sys
import time

import pytest

from fedmoe.shared.errors import FedmoeError
from fedmoe.simulations.benchmarks import scale


def parse(argv):
    p = argparse.ArgumentParser()
    scale.add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("argv, message", [
    (["--sites", "10,15"], "multiple of 2"),
    (["--sites", "ten"], "comma-separated list"),
    (["--fraction", "0"], "--fraction must be in (0, 1]"),
    (["--rounds", "0"], "must be >= 1"),
])
def test_bench_scale_bad_input_is_one_line(argv, message):
    with pytest.raises(FedmoeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")) as exc:
        scale.run(parse(argv))
    assert "\n" not in str(exc.value)


def test_memory_sampler_tells_actors_from_the_coordinator():
    # a parent (the coordinator) holding ~60 MB with a child named as Ray names an actor process
    code = ("import subprocess, sys, time; b = bytearray(60 * 2**20); "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; b = bytearray(30 * 2**20); time.sleep(1.5)', "
            "'ray::ClientAppActor']); c.wait()")
    proc = subprocess.Popen([sys.executable, "-c", code])
    sampler = scale.MemorySampler(proc.pid, 0.05)
    proc.wait(timeout=30)
    time.sleep(0.1)
    mem = sampler.finish()
    assert mem["actors"] == 1
    assert mem["coordinator_peak_rss_mb"] > 60 and 30 < mem["actor_peak_rss_mb"] < mem["coordinator_peak_rss_mb"]


@pytest.mark.slow  # one federation of 2 sites (Ray start-up, one round): ~30 s on 2 cores
def test_bench_scale_tiny_run_json_and_plot(tmp_path):
    result = scale.run(parse(["--sites", "2", "--fraction", "1", "--rounds", "1", "--keep-runs", str(tmp_path / "runs")]))
    (entry,) = result["per_n"]
    assert result["reference_is_a_run_above"] and result["reference"] == entry  # fraction 1: the run is its reference
    assert result["rss_ratio"] == 1.0 and result["round_ratio"] == 1.0 and result["actor_rss_ratio"] == 1.0
    assert entry["sites"] == 2 and entry["sampled_per_round"] == 2 and entry["failed_replies"] == 0
    assert entry["actors"] >= 1 and entry["actor_peak_rss_mb"] > 100 and entry["coordinator_peak_rss_mb"] > 100
    assert entry["seconds_per_round"] > 0 and entry["start_seconds"] > 0
    assert 0 <= entry["outside_training_seconds_per_round"] <= entry["seconds_per_round"]
    assert entry["run_db_bytes"] > 0 and entry["run_dir_bytes"] > entry["run_db_bytes"]  # checkpoints beside run.db
    assert entry["rounds"][0]["sites"] == 2 and entry["rounds"][0]["site_training_seconds"] > 0
    scale.plot(result, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 0
    assert "rss_ratio 1.00" in scale.summary(result)
    json.dumps(result)
