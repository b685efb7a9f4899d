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
from fedmoe.shared.errors import FedmoeError, SitePolicyError

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


# -- dp/secagg: no per-site loss recorded; the site's own privacy policy -------------------

def test_dp_round_records_no_per_site_loss_even_if_a_site_sends_one():
    s = strategy(privacy="dp", noise_multiplier=1.0, clip=0.5)
    sent = s.configure_train(1)
    outs = [site_reply(msg, node, 0.01, clip=0.5) for _, node, msg in sent]  # these replies carry a train-loss
    result = s.aggregate_train(1, sent, [o[2] for o in outs])
    assert [p["status"] for p in result.participation] == ["ok"] * 3
    assert all(p["loss"] is None for p in result.participation)
    assert "train_loss" not in result.metrics["law"] and result.metrics["law"]["sites_ok"] == 3
    plain = strategy(privacy="none")
    sent = plain.configure_train(1)
    assert all(msg.content["config"]["privacy"] == "none" for _, _, msg in sent)


def modes_config(mode, **kw):
    """A TRAIN config as the coordinator sends it in `mode`."""
    return strategy(privacy=mode, **kw).train_config(1, "law", Node(1, "site-1", "law", 4, "fp", 10))


def test_site_policy_accepts_modes_at_least_as_private_and_dp_secagg_are_not_comparable():
    from fedmoe.client.privacy import SitePolicy

    assert SitePolicy.parse(None).accepted == {"none", "ffa", "dp", "secagg"}
    assert SitePolicy.parse("ffa").accepted == {"ffa", "dp", "secagg"}
    assert SitePolicy.parse("dp").accepted == {"dp"} and SitePolicy.parse("secagg").accepted == {"secagg"}
    assert SitePolicy.parse("dp, secagg").accepted == SitePolicy.parse(["dp", "secagg"]).accepted == {"dp", "secagg"}
    with pytest.raises(FedmoeError, match="unknown privacy mode 'strong'"):
        SitePolicy.parse("dp,strong")
    with pytest.raises(FedmoeError, match="max clip must be > 0"):
        SitePolicy.parse("dp", max_clip=0)
    both = SitePolicy.parse("ffa", 0.5).stricter(SitePolicy.parse("dp,secagg", 0.8, 2.0))
    assert both == SitePolicy(frozenset({"dp", "secagg"}), 0.8, 2.0)  # neither loosens the other
    with pytest.raises(FedmoeError, match="no mode in common"):
        SitePolicy.parse("dp").stricter(SitePolicy.parse("secagg"))


def test_site_policy_refuses_weaker_trains_with_a_one_line_reason():
    from fedmoe.client.privacy import SitePolicy

    dp = SitePolicy.parse("dp", min_noise_multiplier=0.8, max_clip=1.0)
    assert dp.check_train(modes_config("dp", noise_multiplier=1.0, clip=0.5)) == "dp"
    for mode in ("none", "ffa", "secagg"):
        with pytest.raises(SitePolicyError, match=f"^site policy: refused to train under privacy mode {mode}; this site accepts dp"):
            dp.check_train(modes_config(mode))
    with pytest.raises(SitePolicyError, match="noise multiplier 0.5 < 0.8"):
        dp.check_train(modes_config("dp", noise_multiplier=0.5, clip=0.5))
    with pytest.raises(SitePolicyError, match="clip 2 > 1"):
        dp.check_train(modes_config("dp", noise_multiplier=1.0, clip=2.0))
    # A declaration the request does not back counts as the weakest mode it is: "dp" without
    # a clip for the site to apply is ffa; without the noise multiplier, too.
    forged = modes_config("dp", noise_multiplier=1.0, clip=0.5)
    for drop in ("dp-clip", "dp-noise-multiplier"):
        with pytest.raises(SitePolicyError, match="privacy mode ffa \\(declared 'dp'\\)"):
            dp.check_train({k: v for k, v in forged.items() if k != drop})
    assert SitePolicy.parse("ffa").check_train(modes_config("secagg")) == "secagg"
    assert SitePolicy().check_train(modes_config("none")) == "none"
    # EVALUATE: no per-site metrics where the policy or the declared mode withholds them.
    with pytest.raises(SitePolicyError, match="no evaluation metrics"):
        dp.check_evaluate({"privacy": "none"})
    with pytest.raises(SitePolicyError, match="under privacy secagg"):
        SitePolicy().check_evaluate({"privacy": "secagg"})
    SitePolicy.parse("ffa").check_evaluate({"privacy": "ffa"})


def test_a_refused_train_never_reads_the_adapter_or_the_model(tmp_path):
    """jobs.train_in_process checks the policy first: here the 'adapter' is None and the
    model path does not exist, so anything past the check would fail differently."""
    from fedmoe.client import jobs
    from fedmoe.client.site import SiteSettings
    from fedmoe.shared.data import write_jsonl

    site = tmp_path / "site-a"
    site.mkdir()
    (site / "site.toml").write_text('domain = "law"\nmin_privacy = "dp"\nmin_noise_multiplier = 0.8\n')
    write_jsonl(site / "train.jsonl", [{"prompt": "q", "completion": "a"}])
    settings = SiteSettings(str(site), None, 4, "none", str(tmp_path / "no-model"))
    with pytest.raises(SitePolicyError, match="privacy mode none; this site accepts dp; dp noise multiplier >= 0.8"):
        jobs.train_in_process(settings, None, modes_config("none"))
    with pytest.raises(SitePolicyError, match="noise multiplier 0.5 < 0.8"):
        jobs.train_in_process(settings, None, modes_config("dp", noise_multiplier=0.5, clip=0.5))
    # the command line can only tighten site.toml
    strict = SiteSettings(str(site), None, 4, "none", None, "secagg")
    with pytest.raises(FedmoeError, match="no mode in common"):
        jobs.train_in_process(strict, None, modes_config("dp", noise_multiplier=1.0, clip=0.5))
    (site / "site.toml").write_text('domain = "law"\nmin_privacy = "strongest"\n')
    from fedmoe.client import site as site_mod

    site_mod._sites.clear()
    with pytest.raises(FedmoeError, match="site.toml min_privacy: unknown privacy mode 'strongest'"):
        jobs.train_in_process(settings, None, modes_config("dp", noise_multiplier=1.0, clip=0.5))
    site_mod._sites.clear()


def test_a_refusal_is_recorded_as_that_sites_failure_with_the_reason():
    from flwr.app import Error

    s = strategy(privacy="none")
    sent = s.configure_train(1)
    reason = "site policy: refused to train under privacy mode none; this site accepts dp"
    replies = [Message(Error(code=1000, reason=reason), reply_to=sent[0][2])] + \
              [Message(RecordDict({"arrays": msg.content["arrays"], "config": msg.content["config"],
                                   "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0})}), reply_to=msg)
               for _, _, msg in sent[1:]]
    result = s.aggregate_train(1, sent, replies)
    row = next(p for p in result.participation if p["site"] == "site-1")
    assert row["status"] == "failed" and row["reason"] == f"site error: {reason}"
    assert result.metrics["law"]["sites_ok"] == 2


# -- the learned gate's router rounds under DP ------------------------------------------

def router_sites(dim=6, experts=2, n=4, scale=1.0):
    """Sites that each move the router by `scale` x a fixed direction (more than any clip)."""
    from fedmoe.client.router import clip_router_update

    def site(i, clip):
        def step(state):
            new = {k: v + scale * (i + 1) * torch.ones_like(v) for k, v in state.items() if k != "center"} | {"center": state["center"]}
            if clip is not None:
                new, _ = clip_router_update(new, state, clip)
                return new, 10, {}
            return new, 10, {"router_loss": 1.0}
        return step
    return site


def test_router_rounds_clip_noise_and_account_like_the_experts():
    from fedmoe.server.moe.gates.learned import RouterPrivacy, federated_router_rounds, router_privacy_info

    site = router_sites()
    priv = RouterPrivacy(noise_multiplier=1.0, clip=0.5)
    center = torch.arange(6.0)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the run seed: the noise must not follow it
        state, history = federated_router_rounds(6, 2, [site(i, 0.5) for i in range(4)] + [site(9, None)], rounds=3,
                                                 privacy=priv, center=center)
        runs.append(state)
    assert not torch.equal(runs[0]["proj.weight"], runs[1]["proj.weight"]), "noise repeated under the same seed"
    assert torch.equal(runs[0]["center"], center)  # the center is the coordinator's, never noised
    assert [h["sites_ok"] for h in history] == [4, 4, 4] and [h["sites_over_clip"] for h in history] == [1, 1, 1]
    assert history[0]["noise_std"] == pytest.approx(1.0 * 0.5 / 4)
    assert "router_loss" not in history[-1]
    acc = PrivacyAccountant(1.0, 1e-5)
    acc.step(1.0, 3)
    assert history[-1]["epsilon"] == pytest.approx(acc.epsilon())
    info = router_privacy_info(priv, 3, 4, center=(2.0, 1e-5))
    assert info["private"] and info["epsilon_router"] == pytest.approx(acc.epsilon())
    assert info["epsilon"] == pytest.approx(acc.epsilon() + 2.0) and info["delta"] == pytest.approx(2e-5)
    assert info["noise_multiplier"] == 1.0 and info["clip_norm"] == 0.5
    assert router_privacy_info(None, 3, 4)["private"] is False
    with pytest.raises(FedmoeError, match="every router update exceeds the DP clip"):
        federated_router_rounds(6, 2, [site(0, None)], rounds=1, privacy=priv)
    with pytest.raises(FedmoeError, match="noise multiplier must be > 0"):
        RouterPrivacy(noise_multiplier=0.0)


def test_site_router_update_is_clipped_and_sends_no_loss():
    from fedmoe.client.router import RouterSiteData, local_router_update
    from fedmoe.shared.features import LinearRouter

    gen = torch.Generator().manual_seed(0)
    data = RouterSiteData(torch.randn(32, 6, generator=gen), torch.randn(32, 2, generator=gen))
    state = dict(LinearRouter(6, 2).state_dict())
    free, n, metrics = local_router_update(state, data, steps=5, lr=1.0)
    assert n == 32 and "router_loss" in metrics
    norm = lambda s: math.sqrt(sum(float(((s[k] - state[k]) ** 2).sum()) for k in state))  # noqa: E731
    assert norm(free) > 0.05
    clipped, _, metrics = local_router_update(state, data, steps=5, lr=1.0, clip=0.05)
    assert metrics == {} and norm(clipped) == pytest.approx(0.05, rel=1e-4)
    assert torch.equal(clipped["center"], state["center"])
