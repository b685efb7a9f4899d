"""DP and frozen-A (FFA-LoRA) aggregation: site clipping, the accountant against Opacus's
own RDP computation, equal-weight noisy means, the budget stop, membership-inference AUC."""

import math

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedmoe.client.privacy import b_update_norm, clip_b_update
from fedmoe.server.federation.aggregation import dense_update
from fedmoe.server.federation.privacy import PrivacyAccountant, loss_threshold_auc
from fedmoe.server.federation.strategy import DomainExpertStrategy, Node, StrategyConfig
from fedmoe.shared.delta import AdapterSpec, LoraDelta

MODULES = {"m.q_proj": (16, 12), "m.v_proj": (16, 8)}
SPEC = AdapterSpec(MODULES)


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_epsilon_matches_opacus_rdp_computation():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    z, q, rounds, delta = 1.1, 0.5, 6, 1e-5
    acc = PrivacyAccountant(z, delta)
    for _ in range(rounds):
        acc.step(q, steps=2)
    orders = RDPAccountant.DEFAULT_ALPHAS
    want, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=z, steps=2 * rounds, orders=orders), delta=delta)
    assert acc.epsilon() == pytest.approx(want, rel=1e-9)
    # q = 1: the Gaussian mechanism's RDP is exactly T α / (2 z²)
    rdp = compute_rdp(q=1.0, noise_multiplier=z, steps=rounds, orders=[8.0])
    assert rdp[0] == pytest.approx(rounds * 8.0 / (2 * z * z))
    assert acc.epsilon_after(q, 2) > acc.epsilon()
    assert PrivacyAccountant(1.0, delta).epsilon() == 0.0


def received(rank=4, seed=0) -> LoraDelta:
    g = torch.Generator().manual_seed(seed)
    return LoraDelta.from_factors({m: (torch.randn(rank, fi, generator=g), torch.randn(fo, rank, generator=g))
                                   for m, (fi, fo) in MODULES.items()}, rank, 2.0 * rank, "fp")


def test_site_clipping_keeps_a_and_bounds_the_update():
    r = received()
    t = LoraDelta({k: (v + 3.0 if ".lora_B." in k else v) for k, v in r.tensors.items()}, 4, 8.0, "fp")
    clipped, norm = clip_b_update(t, r, 0.5)
    assert norm > 0.5 and b_update_norm(clipped, r) == pytest.approx(0.5, rel=1e-5)
    for m in MODULES:
        assert torch.equal(clipped.factors(m)[0], r.factors(m)[0])
    same, _ = clip_b_update(t, r, 1e9)
    assert all(torch.allclose(same.tensors[k], t.tensors[k]) for k in t.tensors)


def strategy(**kw):
    s = DomainExpertStrategy(StrategyConfig(**kw), SPEC, "fp")
    for i, rank in enumerate([4, 8, 8], start=1):
        s.add_node(Node(i, f"site-{i}", "law", rank, "fp", 10 * i))
    return s


def site_reply(msg, node, shift, clip=None, touch_a=False):
    d = LoraDelta.from_records(msg.content["arrays"], msg.content["config"])
    assert msg.content["config"]["freeze-a"] is True
    t = LoraDelta({k: v + (shift if ".lora_B." in k else 0.0) for k, v in d.tensors.items()}, d.rank, d.alpha, "fp")
    if clip is not None:
        t, _ = clip_b_update(t, d, clip)
    if touch_a:
        t = LoraDelta({k: v + (1e-3 if ".lora_A." in k else 0.0) for k, v in t.tensors.items()}, d.rank, d.alpha, "fp")
    arrays, meta = t.to_records()
    return t, d, Message(RecordDict({"arrays": arrays, "config": meta, "metrics": MetricRecord({"num-examples": 10 * node.node_id, "train-loss": 1.0})}), reply_to=msg)


def test_ffa_aggregate_is_the_exact_weighted_sum_against_the_frozen_a():
    s = strategy(privacy="ffa")
    sent = s.configure_train(1)
    outs = [site_reply(msg, node, 0.01 * node.node_id) for _, node, msg in sent]
    result = s.aggregate_train(1, sent, [o[2] for o in outs])
    assert not result.rejections
    a0 = s.init_adapter(8)
    total = sum(10 * n.node_id for _, n, _ in sent)
    for m in MODULES:
        want = sum((10 * n.node_id / total) * (t.scaling * t.factors(m)[1].double() @ a0.factors(m)[0][: n.rank].double())
                   for (t, _, _), (_, n, _) in zip(outs, sent))
        assert torch.allclose(dense_update(s.experts["law"], m).double(), want, atol=1e-5)
    # round 2 sends the same A again
    for _, node, msg in s.configure_train(2):
        d = LoraDelta.from_records(msg.content["arrays"], msg.content["config"])
        assert all(torch.allclose(d.factors(m)[0], a0.factors(m)[0][: node.rank]) for m in MODULES)


def test_dp_round_rejects_unclipped_and_changed_a_and_reports_epsilon():
    s = strategy(privacy="dp", noise_multiplier=1.0, clip=0.5)
    sent = s.configure_train(1)
    assert all(msg.content["config"]["dp-clip"] == 0.5 for _, _, msg in sent)
    outs = [site_reply(sent[0][2], sent[0][1], 1.0, clip=0.5), site_reply(sent[1][2], sent[1][1], 1.0),
            site_reply(sent[2][2], sent[2][1], 0.01, clip=0.5, touch_a=True)]
    result = s.aggregate_train(1, sent, [o[2] for o in outs])
    reasons = {r["site"]: r["reason"] for r in result.rejections}
    assert set(reasons) == {"site-2", "site-3"}
    assert "exceeds the DP clip" in reasons["site-2"] and "lora_A changed" in reasons["site-3"]
    m = result.metrics["law"]
    assert m["dp_noise_std"] == pytest.approx(1.0 * 0.5 / 1)
    assert m["dp_epsilon"] == pytest.approx(s.accountant.epsilon()) and m["dp_epsilon"] > 0


def test_budget_stop_names_the_round_and_the_epsilon():
    s = strategy(privacy="dp", noise_multiplier=1.0, clip=0.5, epsilon_budget=5.0)
    assert s.budget_stop(1) is None  # one step at z=1, q=1: ε ≈ 4.4 at δ=1e-5
    s.accountant.step(1.0)
    reason = s.budget_stop(2)
    assert reason and "round 2" in reason and "budget 5" in reason and "stopping after round 1" in reason


def test_loss_threshold_auc():
    assert loss_threshold_auc([0.1, 0.2], [0.5, 0.6]) == 1.0
    assert loss_threshold_auc([0.5, 0.6], [0.1, 0.2]) == 0.0
    assert loss_threshold_auc([0.3, 0.3], [0.3, 0.3]) == 0.5
