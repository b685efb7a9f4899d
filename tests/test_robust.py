"""Robust aggregation: update norms in factored form, outlier rejection, norm bounding,
coordinate-wise trimmed mean / median, and the strategy hook."""

import math

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedmoe.server.federation import robust
from fedmoe.server.federation.aggregation import dense_update, exact_lora_aggregate
from fedmoe.server.federation.strategy import DomainExpertStrategy, Node, StrategyConfig
from fedmoe.shared.delta import AdapterSpec, LoraDelta

MODULES = {"m.q_proj": (16, 12), "m.v_proj": (16, 8)}
SPEC = AdapterSpec(MODULES)


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def rand_delta(seed: int, rank: int = 4, scale: float = 1.0) -> LoraDelta:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(rank, fi, generator=g) * scale, torch.randn(fo, rank, generator=g) * scale)
               for m, (fi, fo) in MODULES.items()}
    return LoraDelta.from_factors(factors, rank, 2.0 * rank, "fp")


def dense(d: LoraDelta, m: str) -> torch.Tensor:
    a, b = d.factors(m)
    return d.scaling * b.double() @ a.double()


def perturb(d: LoraDelta, seed: int, eps: float) -> LoraDelta:
    g = torch.Generator().manual_seed(seed)
    return LoraDelta({k: v + eps * torch.randn(v.shape, generator=g) for k, v in d.tensors.items()}, d.rank, d.alpha, "fp")


def test_update_norm_equals_dense_difference():
    sent, trained = rand_delta(0), rand_delta(1, rank=4)
    want = math.sqrt(sum(float(((dense(trained, m) - dense(sent, m)) ** 2).sum()) for m in MODULES))
    assert robust.update_norm(trained, sent) == pytest.approx(want, rel=1e-9)


def test_shrink_update_is_exact_and_hits_the_bound():
    sent, trained = rand_delta(0), rand_delta(1)
    shrunk = robust.shrink_update(trained, sent, 0.3)
    for m in MODULES:
        want = dense(sent, m) + 0.3 * (dense(trained, m) - dense(sent, m))
        assert torch.allclose(dense(shrunk, m), want, atol=1e-4)
    assert robust.update_norm(shrunk, sent) == pytest.approx(0.3 * robust.update_norm(trained, sent), rel=1e-4)


def test_screen_rejects_the_boosted_site_and_keeps_honest_ones():
    sent = rand_delta(0)
    honest = [perturb(sent, i, 0.05) for i in range(1, 6)]
    boosted = LoraDelta({k: (v * 25 if ".lora_B." in k else v) for k, v in perturb(sent, 9, 0.05).tensors.items()}, 4, 8.0, "fp")
    out = robust.screen([(i, d, sent) for i, d in enumerate(honest + [boosted])], robust.RobustConfig("norm"))
    assert [s.status for s in out[:5]] == ["ok"] * 5
    assert out[5].status == "rejected" and "outlier" in out[5].reason and "median" in out[5].reason


def test_screen_with_two_replies_uses_the_smaller_as_reference():
    sent = rand_delta(0)
    honest, boosted = perturb(sent, 1, 0.05), LoraDelta({k: v * 25 for k, v in perturb(sent, 2, 0.05).tensors.items()}, 4, 8.0, "fp")
    out = robust.screen([("h", honest, sent), ("b", boosted, sent)], robust.RobustConfig("norm"))
    assert [s.status for s in out] == ["ok", "rejected"]


def test_screen_bounds_a_moderately_large_update():
    sent = rand_delta(0)
    deltas = [perturb(sent, i, 0.05) for i in range(1, 8)] + [perturb(sent, 99, 0.05 * 3)]
    out = robust.screen([(i, d, sent) for i, d in enumerate(deltas)], robust.RobustConfig("norm", reject_factor=10, outlier_z=100))
    med = sorted(s.norm for s in out)[3]
    clipped = [s for s in out if s.status == "clipped"]
    assert clipped and all(robust.update_norm(s.delta, sent) == pytest.approx(2 * med, rel=1e-3) for s in clipped)
    exact_lora_aggregate([(s.delta, 1.0) for s in out], max_rank=8)  # mixed ranks still aggregate exactly


def test_trimmed_mean_and_median_ignore_one_wild_site():
    base = rand_delta(0)
    honest = [perturb(base, i, 0.01) for i in range(1, 5)]
    wild = LoraDelta({k: v + 1e3 for k, v in base.tensors.items()}, 4, 8.0, "fp")
    for method in ("median", "trimmed-mean"):
        agg = robust.coordinate_aggregate([(d, 1.0) for d in honest + [wild]], method, trim=0.2)
        for m in MODULES:
            assert torch.allclose(dense_update(agg, m).double(), dense(base, m), atol=0.2), method
    assert torch.equal(robust.trimmed_mean(torch.arange(5.0)[:, None], 0.2), torch.tensor([2.0]))


def test_unknown_method_is_an_error():
    from fedmoe.shared.errors import FedmoeError

    with pytest.raises(FedmoeError, match="unknown robust"):
        robust.RobustConfig("krum")


def test_strategy_rejects_boosted_reply_with_its_norm():
    s = DomainExpertStrategy(StrategyConfig(robust="norm"), SPEC, "fp")
    for i in range(1, 5):
        s.add_node(Node(i, f"site-{i}", "law", 4, "fp", 10))
    sent = s.configure_train(1)
    replies = []
    for expert, node, msg in sent:
        d = perturb(LoraDelta.from_records(msg.content["arrays"], msg.content["config"]), node.node_id, 0.05)
        if node.node_id == 4:
            d = LoraDelta({k: (v * 25 if ".lora_B." in k else v) for k, v in d.tensors.items()}, d.rank, d.alpha, "fp")
        arrays, meta = d.to_records()
        replies.append(Message(RecordDict({"arrays": arrays, "config": meta,
                                           "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0})}), reply_to=msg))
    result = s.aggregate_train(1, sent, replies)
    status = {p["site"]: p["status"] for p in result.participation}
    assert status == {"site-1": "ok", "site-2": "ok", "site-3": "ok", "site-4": "rejected"}
    assert [r["site"] for r in result.rejections] == ["site-4"] and "outlier" in result.rejections[0]["reason"]
    assert result.metrics["law"]["sites_ok"] == 3
