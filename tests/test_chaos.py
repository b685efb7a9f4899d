"""Chaos: the seeded fault schedule, what a faulty site sends, that the strategy rejects
every NaN and wrong-shape reply with its reason, and a smoke federation under chaos with
robust aggregation that stays within 2 points of the clean run."""

import json
import os
import subprocess
import sys

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedmoe.client import chaos
from fedmoe.server.federation.strategy import DomainExpertStrategy, Node, StrategyConfig
from fedmoe.shared.delta import AdapterSpec, LoraDelta
from fedmoe.shared.errors import FedmoeError

SPEC = AdapterSpec({"m.q_proj": (16, 12), "m.v_proj": (16, 8)})
SPEC_STRING = "nan=0.1,shape=0.05,scale=0.1,dropout=0.2,seed=68"


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_parse_and_schedule_are_seeded_and_checked():
    rates = chaos.parse_chaos(SPEC_STRING)
    assert rates == {"nan": 0.1, "shape": 0.05, "scale": 0.1, "dropout": 0.2} and chaos.chaos_seed(SPEC_STRING, 0) == 68
    for bad, msg in [("boom=0.1", "unknown fault"), ("nan=x", "not a number"), ("nan=0.7,scale=0.6", "add up"), ("nan=2", "in \\[0, 1\\]")]:
        with pytest.raises(FedmoeError, match=msg):
            chaos.parse_chaos(bad)
    experts = {f"site-0{i}": ["law" if i % 2 else "medicine"] for i in range(4)}
    a = chaos.schedule(rates, 68, 2, list(experts), experts)
    assert a == chaos.schedule(rates, 68, 2, list(experts), experts)
    assert {x["fault"] for x in a} == set(chaos.FAULTS)
    many = chaos.schedule({"nan": 0.25}, 1, 40, list(experts), experts)
    assert 20 < len(many) < 60  # ~ 0.25 * 160


def test_corrupt_makes_each_fault():
    g = torch.Generator().manual_seed(0)
    d = LoraDelta.from_factors({m: (torch.randn(4, fi, generator=g), torch.randn(fo, 4, generator=g)) for m, (fi, fo) in SPEC.modules.items()}, 4, 8.0, "fp")
    assert chaos.corrupt(d, None) is d
    assert not all(torch.isfinite(t).all() for t in chaos.corrupt(d, "nan").tensors.values())
    assert any(t.shape != d.tensors[k].shape for k, t in chaos.corrupt(d, "shape").tensors.items())
    assert chaos.corrupt(d, "scale").update_norm() == pytest.approx(chaos.SCALE_BOOST * d.update_norm(), rel=1e-4)
    with pytest.raises(chaos.ChaosDropout):
        chaos.corrupt(d, "dropout")


def test_strategy_rejects_nan_and_shape_faults_with_reasons():
    s = DomainExpertStrategy(StrategyConfig(robust="norm"), SPEC, "fp")
    for i in range(1, 6):
        s.add_node(Node(i, f"site-{i}", "law", 4, "fp", 10))
    sent = s.configure_train(1)
    faults = {1: "nan", 2: "shape", 3: "scale"}
    replies = []
    for _, node, msg in sent:
        d = LoraDelta.from_records(msg.content["arrays"], msg.content["config"])
        g = torch.Generator().manual_seed(node.node_id)
        d = LoraDelta({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in d.tensors.items()}, 4, d.alpha, "fp")
        arrays, meta = chaos.corrupt(d, faults.get(node.node_id)).to_records()
        replies.append(Message(RecordDict({"arrays": arrays, "config": meta, "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg))
    result = s.aggregate_train(1, sent, replies)
    reasons = {r["site"]: r["reason"] for r in result.rejections}
    assert set(reasons) == {"site-1", "site-2", "site-3"}
    assert "non-finite" in reasons["site-1"] and "shape" in reasons["site-2"] and "outlier" in reasons["site-3"]
    assert result.metrics["law"]["sites_ok"] == 2


@pytest.mark.slow
def test_chaos_smoke_run_rejects_every_fault_with_its_reason(tmp_path):
    out = tmp_path / "chaos"
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    proc = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--preset", "smoke", "--rounds", "2",
                           "--no-baselines", "--no-mia", "--no-moe", "--robust", "norm", "--chaos", SPEC_STRING, "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    injected = report["chaos"]["injected"]
    assert {i["fault"] for i in injected} == set(chaos.FAULTS)
    for item in injected:
        if item["fault"] in ("nan", "shape"):
            assert item["outcome"] == "rejected", item
            assert ("non-finite" if item["fault"] == "nan" else "shape") in item["reason"]
        elif item["fault"] == "scale":
            assert item["outcome"] == "rejected" and "outlier" in item["reason"], item
        else:
            assert item["outcome"] == "failed" and item["reason"].startswith("site error"), item


@pytest.mark.slow
def test_boosted_attacker_leaves_accuracy_within_two_points(tmp_path, smoke_run):
    """The attacker alone (one boosted update, round 1): robust aggregation rejects it and
    the experts score within 2 points of the clean run. (In the mixed chaos run above the
    NaN, shape and dropout faults also remove honest updates, so its accuracy is not the
    attacker's doing.)"""
    out = tmp_path / "attacked"
    proc = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--preset", "smoke", "--rounds", "2",
                           "--no-baselines", "--no-mia", "--no-moe", "--robust", "norm", "--chaos", "scale=0.2,seed=5",
                           "--out", str(out), "--json"], capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, RAY_DEDUP_LOGS="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    [attack] = report["chaos"]["injected"]
    assert attack["fault"] == "scale" and attack["outcome"] == "rejected" and "outlier" in attack["reason"], attack
    clean = json.loads((smoke_run / "report.json").read_text())["methods"]["experts_oracle"]["mixed"]
    assert abs(report["methods"]["experts_oracle"]["mixed"] - clean) <= 0.02
