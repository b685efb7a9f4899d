"""Short rounds (dropouts): an expert with fewer than `min_replies` accepted replies at the
round deadline proceeds with what arrived, or re-sends to the missing sites first
(`short_round` retry | fail, `max_retries`), never waiting past its deadlines. Driven
through `DomainExpertStrategy.collect_train` with a fake grid: no Flower engine."""

import time
from uuid import uuid4

import pytest
import torch
from flwr.app import Error, Message
from test_strategy import SPEC, reply, trained

from fedmoe.server.federation.run_store import RunStore
from fedmoe.server.federation.strategy import DomainExpertStrategy, Node, ShortRoundError, StrategyConfig
from fedmoe.shared.errors import FedmoeError

pytestmark = pytest.mark.usefixtures("flower_task_identity")
TIMEOUT = 0.3  # seconds per attempt


class FakeGrid:
    """The grid as the strategy sees it. Node n answers its k-th message as `plan[n][k]` says:
    "ok" (a delta trained deterministically from what it was sent, like a real site with
    its per-round seed), "error" (a site error) or None (silence: the deadline passes)."""

    def __init__(self, plan: dict[int, list], online: list[int] | None = None):
        self.plan, self.online, self.ready, self.pushes = plan, online, {}, {n: 0 for n in plan}

    def get_node_ids(self):
        return list(self.plan if self.online is None else self.online)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids do
            node = m.metadata.dst_node_id
            k, self.pushes[node] = self.pushes[node], self.pushes[node] + 1
            what = self.plan[node][k] if k < len(self.plan[node]) else None
            if what == "ok":
                self.ready[m.metadata.message_id] = reply(m, trained(m, seed=node))
            elif what == "error":
                self.ready[m.metadata.message_id] = Message(Error(code=0, reason="site daemon gone"), reply_to=m)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.ready.pop(i) for i in list(ids) if i in self.ready]


def strategy(**kw) -> DomainExpertStrategy:
    s = DomainExpertStrategy(StrategyConfig(round_timeout=TIMEOUT, **kw), SPEC, "fp")
    for i, domain in enumerate(["law", "law", "medicine"], start=1):
        s.add_node(Node(i, f"site-{i}", domain, 4, "fp", 10))
    return s


def one_round(plan, online=None, **kw):
    s, grid = strategy(**kw), FakeGrid(plan, online)
    sent = s.configure_train(1)
    replies, resends = s.collect_train(grid, 1, sent)
    return s, grid, s.aggregate_train(1, sent, replies, resends)


def law(s) -> dict[str, torch.Tensor]:
    return s.expert_delta("law").tensors


def row(result, site):
    return next(p for p in result.participation if p["site"] == site)


def test_retry_resends_to_the_silent_site_and_gives_the_full_round():
    full, _, _ = one_round({1: ["ok"], 2: ["ok"], 3: ["ok"]}, min_replies=2)
    s, grid, result = one_round({1: ["ok"], 2: [None, "ok"], 3: ["ok"]}, min_replies=2, short_round="retry")
    assert grid.pushes == {1: 1, 2: 2, 3: 1}  # only the missing law site is asked again; medicine needs 1 of 1
    assert row(result, "site-2")["status"] == "ok" and "after 1 re-send" in row(result, "site-2")["reason"]
    assert row(result, "site-2")["bytes_out"] == 2 * row(result, "site-1")["bytes_out"]
    assert result.metrics["law"]["sites_ok"] == 2 and result.metrics["law"]["resends"] == 1
    assert "short_round" not in result.metrics["law"]
    assert all(torch.equal(a, b) for a, b in zip(law(s).values(), law(full).values()))  # the lost reply, recovered


@pytest.mark.parametrize("policy", ["proceed", "retry", "fail"])
def test_a_site_that_never_answers(policy, tmp_path):
    plan = {1: ["ok"], 2: ["error", None], 3: ["ok"]}
    started = time.monotonic()
    if policy == "fail":
        with pytest.raises(ShortRoundError, match=r"round 1: too few accepted replies \(law 1 of 2\) after 1 re-send"):
            one_round(plan, min_replies=2, short_round="fail")
        assert time.monotonic() - started < 2 * TIMEOUT + 1.0
        return
    s, grid, result = one_round(plan, min_replies=2, short_round=policy)
    assert time.monotonic() - started < 2 * TIMEOUT + 1.0  # one deadline per attempt, never more
    assert grid.pushes[2] == (2 if policy == "retry" else 1)
    failed = row(result, "site-2")
    assert failed["status"] == "failed"
    if policy == "retry":
        assert failed["reason"] == "no reply before the round deadline (after 1 re-send(s))"
        assert result.metrics["law"]["resends"] == 1
    else:
        assert failed["reason"].startswith("site error: site daemon gone") and "resends" not in result.metrics["law"]
    assert result.metrics["law"]["short_round"] == 1.0 and result.metrics["law"]["sites_ok"] == 1
    alone, _, _ = one_round({1: ["ok"], 2: [None], 3: ["ok"]})  # law from site-1 alone
    assert all(torch.equal(a, b) for a, b in zip(law(s).values(), law(alone).values()))
    store = RunStore(tmp_path)  # what the run store keeps of it
    store.start_run("test", 0, {})
    store.begin_round(1)
    store.commit_round(1, result.participation, result.metrics, result.rejections, {"law": s.expert_delta("law")})
    assert [p["reason"] for p in store.participation(1) if p["site"] == "site-2"] == [failed["reason"]]
    assert {(m["expert"], m["value"]) for m in store.metrics("short_round")} == {("law", 1.0)}


def test_retry_goes_only_to_connected_sites_and_max_retries_bounds_it():
    s, grid, result = one_round({1: ["ok"], 2: [None], 3: ["ok"]}, online=[1, 3], min_replies=2, short_round="retry")
    assert grid.pushes[2] == 1 and result.metrics["law"]["short_round"] == 1.0
    s, grid, result = one_round({1: ["ok"], 2: [None, None, "ok"], 3: ["ok"]}, min_replies=2, short_round="retry", max_retries=2)
    assert grid.pushes[2] == 3 and row(result, "site-2")["status"] == "ok" and result.metrics["law"]["resends"] == 2
    s, grid, result = one_round({1: ["ok"], 2: [None, "ok"], 3: ["ok"]}, min_replies=2, short_round="retry", max_retries=0)
    assert grid.pushes[2] == 1 and result.metrics["law"]["short_round"] == 1.0


def test_full_rounds_are_never_resent():
    s, grid, result = one_round({1: ["ok"], 2: [None], 3: ["ok"]}, min_replies=1, short_round="fail")
    assert grid.pushes == {1: 1, 2: 1, 3: 1} and "short_round" not in result.metrics["law"]


@pytest.mark.parametrize("kw, msg", [({"short_round": "wait"}, "unknown short-round policy 'wait'"),
                                     ({"min_replies": 0}, "min-replies must be >= 1"),
                                     ({"max_retries": -1}, "max-retries >= 0")])
def test_bad_policy_config_is_refused(kw, msg):
    with pytest.raises(FedmoeError, match=msg):
        DomainExpertStrategy(StrategyConfig(**kw), SPEC, "fp")
