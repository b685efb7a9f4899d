"""Crash safety: checksummed checkpoints, and resuming with the run's own config. (A SIGKILLed
federation resumed to the same result is tests/test_fault_injection.py.)"""

import subprocess
import sys

import pytest
import torch

from fedmoe.server.federation.run_store import RunStore
from fedmoe.shared.delta import LoraDelta


def delta(seed: int) -> LoraDelta:
    g = torch.Generator().manual_seed(seed)
    return LoraDelta.from_factors({"m.q_proj": (torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g))}, 4, 8.0, "fp")


def test_corrupt_newest_checkpoint_falls_back_to_previous_round(tmp_path):
    store = RunStore(tmp_path)
    store.start_run("smoke", 0, {})
    for rnd in (1, 2):
        store.begin_round(rnd)
        store.commit_round(rnd, [{"site": "s", "node_id": 1, "expert": "law", "status": "ok"}], {"law": {"train_loss": 1.0 / rnd}},
                           [], {"law": delta(rnd)})
    path = tmp_path / "checkpoints/round-0002/law.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    rnd, experts, problems = store.verified_round()
    assert (rnd, experts) == (1, ["law"])
    assert len(problems) == 1 and "round 2" in problems[0] and "corrupt" in problems[0] and "\n" not in problems[0]
    store.discard_after(rnd)
    assert [r["round"] for r in store.rounds()] == [1]
    assert [m["round"] for m in store.metrics()] == [1]  # the corrupt round is not counted twice
    assert store.checkpoint("law", 1).checksum() == delta(1).checksum()
    with pytest.raises(Exception, match="no checkpoint of expert 'law'"):  # round 2 is forgotten
        store.checkpoint("law", 2)


def test_checkpoint_written_atomically(tmp_path):
    store = RunStore(tmp_path)
    store.start_run("smoke", 0, {})
    store.begin_round(1)
    store.commit_round(1, [], {}, [], {"law": delta(1)})
    names = sorted(p.name for p in (tmp_path / "checkpoints/round-0001").iterdir())
    assert names == ["law.safetensors"]  # no leftover .tmp


def test_coordinator_resume_uses_the_run_config_it_started_with(tmp_path, tiny_model_dir):
    """`fedmoe coordinator start --resume OUT`: the stored run config, marked `resume`, is what
    the deployed ServerApp plans from (it then calls the same `resume_experts` as simulate)."""
    import tomli_w

    from fedmoe.server.federation.coordinator import APP_CONFIG, Security, run_coordinator, stored_run_config
    from fedmoe.server.federation.server_app import plan_from_run_config
    from fedmoe.shared.errors import FedmoeError

    proc = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", "coordinator", "start", "--insecure", "--resume",
                           str(tmp_path / "empty")], capture_output=True, text=True, timeout=120)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("fedmoe: error: nothing to resume in"), proc.stderr
    out = tmp_path / "run"
    RunStore(out).start_run("deployed", 0, {})
    started = APP_CONFIG | {"rounds": 4, "min-replies": 2, "short-round": "retry", "out": str(out), "model-path": str(tiny_model_dir)}
    (out / "flwr").mkdir()
    (out / "flwr/run-config.toml").write_text(tomli_w.dumps(started))
    config = stored_run_config(out)
    assert config == {k: v for k, v in started.items() if k != "out"} | {"resume": True}
    plan = plan_from_run_config(config | {"out": str(out)})
    assert plan.resume and plan.rounds == 4 and (plan.strategy.min_replies, plan.strategy.short_round) == (2, "retry")
    assert not plan_from_run_config(APP_CONFIG | {"model-path": str(tiny_model_dir)}).resume
    with pytest.raises(FedmoeError, match="already holds a run"):  # a fresh start never writes over it
        run_coordinator(out, "127.0.0.1", 9, Security(insecure=True), {"rounds": 1})


def test_resume_replays_the_privacy_accountant(tmp_path):
    """The RDP accountant lives in memory: a resumed dp run must go on from the ε of its
    last committed round, not from 0 (else ε is under-reported and the budget overrun)."""
    from fedmoe.server.federation.server_app import resume_experts
    from fedmoe.server.federation.strategy import DomainExpertStrategy, Node, StrategyConfig
    from fedmoe.shared.delta import AdapterSpec

    def dp_strategy():
        s = DomainExpertStrategy(StrategyConfig(privacy="dp", noise_multiplier=1.0, fraction=0.5),
                                 AdapterSpec({"m.q_proj": (8, 6)}), "fp")
        for i in range(4):
            s.add_node(Node(i, f"site-{i}", "law", 4, "fp", 10))
        return s

    ran, store = dp_strategy(), RunStore(tmp_path)
    store.start_run("smoke", 0, {})
    for rnd in (1, 2):
        ran.accountant.step(ran.sample_rate(), ran.steps_per_round())
        store.begin_round(rnd)
        store.commit_round(rnd, [], {"law": {"dp_epsilon": ran.accountant.epsilon()}}, [], {"law": delta(rnd)})
    store.begin_round(3)  # killed in round 3
    resumed, lines = dp_strategy(), []
    assert resume_experts(store, resumed, ["law"], lines.append) == 2
    assert resumed.accountant.epsilon() == pytest.approx(ran.accountant.epsilon()) and resumed.accountant.epsilon() > 0
    ran.accountant.step(ran.sample_rate(), ran.steps_per_round())
    resumed.accountant.step(resumed.sample_rate(), resumed.steps_per_round())
    assert resumed.accountant.epsilon() == pytest.approx(ran.accountant.epsilon())  # round 3 as if never killed
