"""Crash safety at named points: the coordinator is SIGKILLed (FEDMOE_FAULT, fedmoe.server.federation.faults)
during site training, during aggregation, between a checkpoint's temporary file and its
rename, and before the round's SQLite commit; `--resume` must then give exactly what
an uninterrupted run with the same seeds gives, with no gap and no duplicated round."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fedmoe.server.federation.faults import parse_faults
from fedmoe.server.federation.run_store import RunStore
from fedmoe.shared.errors import FedmoeError
from fedmoe.simulations.benchmarks.resume import (committed_rounds, federated_numbers, federation_record, run_simulate,
                                                  simulate_cmd)

KILLED = -signal.SIGKILL


def test_fault_spec_is_parsed_and_checked():
    assert parse_faults("kill:train:1, kill:commit:12") == {("train", 1), ("commit", 12)}
    assert parse_faults(None) == set() and parse_faults("") == set()
    for bad, msg in [("kill:train", "not kill:POINT:ROUND"), ("stop:train:1", "not kill:POINT:ROUND"),
                     ("kill:eval:1", "unknown fault point 'eval'"), ("kill:train:0", "round must be"),
                     ("kill:train:x", "round must be")]:
        with pytest.raises(FedmoeError, match=msg):
            parse_faults(bad)


def test_simulate_refuses_a_mistyped_fault_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, FEDMOE_FAULT="kill:agregate:1"))
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedmoe: error: FEDMOE_FAULT") and "'agregate'" in lines[0]
    assert not (tmp_path / "x").exists()


def test_bench_resume_needs_a_kill(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", "bench", "resume", "--preset", "smoke", "--kills", "0",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "fedmoe: error: --kills must be >= 1, got 0", proc.stderr
    assert not (tmp_path / "resume.json").exists()


STORE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from fedmoe.server.federation.run_store import RunStore
    from fedmoe.shared.delta import LoraDelta

    def delta(seed):
        g = torch.Generator().manual_seed(seed)
        return LoraDelta.from_factors({"m.q_proj": (torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g))}, 4, 8.0, "fp")

    store = RunStore(sys.argv[1])
    rounds = [int(r) for r in sys.argv[2:]]
    if rounds[0] == 1:
        store.start_run("smoke", 0, {})
    for rnd in rounds:
        store.begin_round(rnd)
        store.commit_round(rnd, [{"site": "s", "node_id": 1, "expert": e, "status": "ok"} for e in ("law", "medicine")],
                           {"law": {"train_loss": 1.0 / rnd}}, [], {"law": delta(rnd), "medicine": delta(10 + rnd)})
""")


@pytest.mark.parametrize("point", ["checkpoint", "commit"])
def test_run_store_killed_mid_commit_keeps_the_previous_round(tmp_path, point):
    """Killed with round 2's checkpoint in its temporary file (checkpoint) or with every file
    renamed but the SQLite transaction not run (commit): round 1 is what a resume uses, and
    round 2 committed again is recorded once."""
    env = dict(os.environ, FEDMOE_FAULT=f"kill:{point}:2")
    proc = subprocess.run([sys.executable, "-c", STORE_SCRIPT, str(tmp_path), "1", "2"], env=env, capture_output=True, timeout=120)
    assert proc.returncode == KILLED, proc.stderr.decode()[-2000:]
    files = sorted(p.name for p in (tmp_path / "checkpoints/round-0002").iterdir())
    assert files == (["law.safetensors.tmp"] if point == "checkpoint" else ["law.safetensors", "medicine.safetensors"])
    store = RunStore(tmp_path)
    assert store.verified_round() == (1, ["law", "medicine"], [])
    assert [(r["round"], r["state"]) for r in store.rounds()] == [(1, "committed"), (2, "running")]
    assert {m["round"] for m in store.metrics()} == {1} and {p["round"] for p in store.participation()} == {1}
    store.discard_after(1)
    store.close()
    again = subprocess.run([sys.executable, "-c", STORE_SCRIPT, str(tmp_path), "2"], capture_output=True, timeout=120)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    store = RunStore(tmp_path, readonly=True)
    assert [(r["round"], r["state"]) for r in store.rounds()] == [(1, "committed"), (2, "committed")]
    assert [p["round"] for p in store.participation()] == [1, 1, 2, 2]
    assert store.verified_round()[0] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints/round-0002").iterdir()) == ["law.safetensors", "medicine.safetensors"]


def test_coordinator_killed_at_each_point_resumes_to_the_uninterrupted_run(fed_smoke_run, tmp_path):
    """One smoke federation (2 rounds, 2 experts), SIGKILLed three times in a row and resumed
    after each: in round 1's aggregation (nothing committed yet), in round 2 while its
    sites train (round 1 committed), and in round 2's checkpoint write; then resumed to
    the end. Each restart must continue from what the kill left, and the end result
    equal the never-killed run: report numbers, per-round metrics, participation rows and
    every checkpoint's tensors, with rounds 1 and 2 each committed once."""
    out = tmp_path / "killed"
    chain = [("kill:aggregate:1", []), ("kill:train:2", [1]), ("kill:checkpoint:2", [1])]
    before = []
    for i, (fault, committed) in enumerate(chain):
        r = run_simulate(simulate_cmd(out, rounds=2, resume=i > 0), fault=fault, timeout=900)
        assert r["returncode"] == KILLED, f"{fault}: {r['stderr'][-3000:]}"
        assert committed_rounds(out) == committed, fault
        assert not (out / "report.json").exists() and not (out / "experts").exists()
        if i:
            assert ("resuming after round 1" if before else "resuming: no verified round") in r["stderr"], fault
        before = committed
        if fault == "kill:aggregate:1":
            assert "round 1/2" not in r["stderr"]  # died before the round was logged
        if fault == "kill:train:2":
            assert "round 1/2" in r["stderr"] and "round 2/2" not in r["stderr"]
    assert list((out / "checkpoints/round-0002").glob("*.safetensors.tmp")), "the checkpoint kill left its temporary file"
    final = run_simulate(simulate_cmd(out, resume=True), timeout=900)
    assert final["returncode"] == 0, final["stderr"][-3000:]
    assert "resuming after round 1" in final["stderr"]
    assert not list((out / "checkpoints").glob("*/*.tmp"))
    got, want = federation_record(out), federation_record(fed_smoke_run)
    assert got["rounds"] == [(1, "committed"), (2, "committed")]  # no gap, no duplicated round
    assert got == want
    assert {e for _, e, _, _ in got["checkpoints"]} == {"law", "medicine"}
    report, ref = (json.loads((d / "report.json").read_text()) for d in (out, fed_smoke_run))
    assert federated_numbers(report) == federated_numbers(ref) and "experts_oracle" in federated_numbers(report)
