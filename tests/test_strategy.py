"""DomainExpertStrategy: per-domain groups, rank slicing, reply validation, rejections."""

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedmoe.server.federation.aggregation import dense_update, exact_lora_aggregate
from fedmoe.server.federation.strategy import SINGLE_EXPERT, DomainExpertStrategy, Node, StrategyConfig
from fedmoe.shared.delta import AdapterSpec, LoraDelta

MODULES = {"m.q_proj": (16, 12), "m.v_proj": (16, 8)}
SPEC = AdapterSpec(MODULES)


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def make_strategy(**kw) -> DomainExpertStrategy:
    s = DomainExpertStrategy(StrategyConfig(**kw), SPEC, "fp")
    for i, (domain, rank) in enumerate([("law", 4), ("law", 8), ("medicine", 8)], start=1):
        assert s.add_node(Node(i, f"site-{i}", domain, rank, "fp", 10 * i)) is None
    return s


def trained(msg: Message, seed: int) -> LoraDelta:
    d = LoraDelta.from_records(msg.content["arrays"], msg.content["config"])
    g = torch.Generator().manual_seed(seed)
    return LoraDelta({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in d.tensors.items()}, d.rank, d.alpha, "fp")


def reply(msg: Message, delta: LoraDelta, n: int = 10) -> Message:
    arrays, meta = delta.to_records()
    return Message(RecordDict({"arrays": arrays, "config": meta, "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})}),
                   reply_to=msg)


def test_fingerprint_mismatch_refused():
    s = DomainExpertStrategy(StrategyConfig(), SPEC, "fp")
    assert "differs" in s.add_node(Node(9, "x", "law", 8, "other", 5))
    assert s.groups() == {}


def test_groups_and_rank_sliced_messages():
    s = make_strategy(single_expert=True)
    assert set(s.groups()) == {"law", "medicine", SINGLE_EXPERT}
    sent = s.configure_train(1)
    assert len(sent) == 3 + 3
    for expert, node, msg in sent:
        d = LoraDelta.from_records(msg.content["arrays"], msg.content["config"])
        assert d.rank == node.rank and msg.metadata.dst_node_id == node.node_id
        d.validate(SPEC, "fp")


def test_aggregate_accepts_good_replies_and_rejects_bad_ones_with_reasons():
    s = make_strategy()
    sent = s.configure_train(1)
    by_node = {node.node_id: (expert, node, msg) for expert, node, msg in sent}
    good_law = [trained(by_node[1][2], 1), trained(by_node[2][2], 2)]
    bad = trained(by_node[3][2], 3)
    bad.tensors[next(iter(bad.tensors))][0, 0] = float("nan")
    replies = [reply(by_node[1][2], good_law[0], 10), reply(by_node[2][2], good_law[1], 30), reply(by_node[3][2], bad)]
    result = s.aggregate_train(1, [by_node[1], by_node[2], by_node[3]], replies)
    status = {p["node_id"]: p["status"] for p in result.participation}
    assert status == {1: "ok", 2: "ok", 3: "rejected"}
    assert "non-finite" in result.rejections[0]["reason"] and result.rejections[0]["node_id"] == 3
    assert "medicine" not in s.experts  # nothing accepted: the expert keeps its previous state
    want = exact_lora_aggregate([(good_law[0], 10.0), (good_law[1], 30.0)], max_rank=8)
    for m in MODULES:
        assert torch.allclose(dense_update(s.experts["law"], m), dense_update(want, m), atol=1e-5)
    assert result.metrics["law"]["sites_ok"] == 2 and result.metrics["medicine"]["sites_failed"] == 1


def test_missing_and_error_replies_are_failures_not_hangs():
    s = make_strategy()
    sent = s.configure_train(1)
    from flwr.app import Error

    err = Message(Error(code=0, reason="boom"), reply_to=sent[0][2])
    result = s.aggregate_train(1, sent, [err, None, None])
    reasons = sorted(p["reason"] for p in result.participation)
    assert all(p["status"] == "failed" for p in result.participation)
    assert any("boom" in r for r in reasons) and any("deadline" in r for r in reasons)


@pytest.mark.parametrize("corrupt, reason", [
    (lambda d: d.tensors.update({next(iter(d.tensors)): torch.zeros(3, 3)}), "shape"),
    (lambda d: d.tensors.update({"m.k_proj.lora_A.weight": torch.zeros(4, 16)}), "unknown module"),
    (lambda d: setattr(d, "base_fingerprint", "other"), "base model"),
])
def test_shape_module_and_fingerprint_faults_rejected(corrupt, reason):
    s = make_strategy()
    sent = [x for x in s.configure_train(1) if x[1].node_id == 1]
    d = trained(sent[0][2], 0)
    corrupt(d)
    result = s.aggregate_train(1, sent, [reply(sent[0][2], d)])
    assert result.participation[0]["status"] == "rejected"
    assert reason in result.rejections[0]["reason"]


def test_boosted_update_over_norm_bound_rejected():
    s = make_strategy(max_update_norm=5.0)
    sent = [x for x in s.configure_train(1) if x[1].node_id == 3]
    d = trained(sent[0][2], 0)
    d = LoraDelta({k: v * 100 for k, v in d.tensors.items()}, d.rank, d.alpha, "fp")
    result = s.aggregate_train(1, sent, [reply(sent[0][2], d)])
    assert "exceeds bound" in result.rejections[0]["reason"]


def test_next_round_sends_the_aggregated_expert():
    s = make_strategy()
    sent = [x for x in s.configure_train(1) if x[0] == "medicine"]
    d = trained(sent[0][2], 5)
    s.aggregate_train(1, sent, [reply(sent[0][2], d)])
    nxt = [x for x in s.configure_train(2) if x[0] == "medicine"][0][2]
    got = LoraDelta.from_records(nxt.content["arrays"], nxt.content["config"])
    for m in MODULES:
        a, b = got.factors(m)
        a0, b0 = d.factors(m)
        assert torch.allclose(got.scaling * b @ a, d.scaling * b0 @ a0, atol=1e-4)
