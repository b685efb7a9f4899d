"""Replies are untrusted input (issue 16): a site's describe and train replies are checked
field by field where they enter, and whatever one reply gets wrong is that reply's
rejection, recorded with its reason, while the run goes on.

The strategy-level tests use real LoraDelta objects and real Flower Messages; the
end-to-end test drives `run_federation` (real model spec, run store and expert files)
through a grid that answers like sites do, one of them hostile."""

import math
from uuid import uuid4

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from test_strategy import make_strategy, reply, trained

from fedmoe.server.federation.run_store import RunStore
from fedmoe.server.federation.server_app import FederationPlan, run_federation
from fedmoe.server.federation.strategy import StrategyConfig, node_from_describe
from fedmoe.shared.delta import LoraDelta
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.names import check_name, inside

pytestmark = pytest.mark.usefixtures("flower_task_identity")


# -- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../../victim", "/etc", "..", ".hidden", "a/b", "a b", "", "x" * 65, "é", None, 3,
                                 "-lead", "ok\n"])
def test_check_name_refuses_path_like_and_odd_names_in_one_line(bad):
    with pytest.raises(FedmoeError) as exc:
        check_name(bad, "domain", "site.toml")
    msg = str(exc.value)
    assert msg.startswith("site.toml: domain name ") and "\n" not in msg and len(msg) < 200


def test_check_name_accepts_ordinary_names_and_inside_catches_escapes(tmp_path):
    for good in ["law", "site-01", "Medicine_2", "x" * 64]:
        assert check_name(good, "site", "here") == good
    assert inside(tmp_path, tmp_path / "experts" / "law") == tmp_path / "experts" / "law"
    with pytest.raises(FedmoeError, match="leaves its folder"):
        inside(tmp_path, tmp_path / "experts" / ".." / ".." / "victim")
    (tmp_path / "link").symlink_to(tmp_path.parent)  # a symlink out is caught too (resolve)
    with pytest.raises(FedmoeError, match="leaves its folder"):
        inside(tmp_path, tmp_path / "link" / "x")


def test_load_site_refuses_a_path_like_domain(tmp_path):
    from fedmoe.shared.data import load_site

    site = tmp_path / "site-1"
    site.mkdir()
    (site / "site.toml").write_text('domain = "../../victim"\n')
    (site / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(FedmoeError, match=r"site.toml: domain name '\.\./\.\./victim' is not allowed"):
        load_site(site)


# -- describe replies -------------------------------------------------------------------------

GOOD = {"site": "site-1", "domain": "law", "rank": 4, "fingerprint": "fp", "num-examples": 10}


@pytest.mark.parametrize("field, value, reason", [
    ("domain", "../../victim", "domain name '../../victim' is not allowed"),
    ("site", "../x", "site name '../x' is not allowed"),
    ("rank", 4.5, "rank must be an integer, got 4.5"),
    ("rank", "4", "rank must be an integer, got '4'"),
    ("rank", 65, "rank must be between 1 and max-rank 64, got 65"),
    ("rank", 0, "rank must be between 1"),
    ("num-examples", math.nan, "num-examples must be a whole number, got nan"),
    ("num-examples", math.inf, "num-examples must be a whole number, got inf"),
    ("num-examples", 1e15, "num-examples must be between 1 and 10000000"),
    ("num-examples", 2.5, "num-examples must be a whole number"),
    ("num-examples", 0, "num-examples must be between 1"),
    ("fingerprint", "f" * 500, "fingerprint must be a short string"),
    ("site", None, "lacks 'site'"),
])
def test_describe_reply_checked_field_by_field(field, value, reason):
    info = dict(GOOD)
    if value is None:
        del info[field]
    else:
        info[field] = value
    with pytest.raises(FedmoeError) as exc:
        node_from_describe(7, info, StrategyConfig())
    assert str(exc.value).startswith("describe reply of node 7") and reason in str(exc.value) and "\n" not in str(exc.value)
    assert node_from_describe(7, GOOD, StrategyConfig()).domain == "law"
    assert node_from_describe(7, GOOD | {"num-examples": 10.0}, StrategyConfig()).num_examples == 10


# -- train replies ----------------------------------------------------------------------------

def one_reply(content_edit=None, delta_edit=None, **kw):
    """Site 3 (medicine, rank 8) answers round 1 with a trained delta, edited to be malformed."""
    s = make_strategy(**kw)
    sent = [x for x in s.configure_train(1) if x[1].node_id == 3]
    d = trained(sent[0][2], 3)
    if delta_edit:
        d = delta_edit(d)
    r = reply(sent[0][2], d)
    if content_edit:
        content_edit(r.content)
    result = s.aggregate_train(1, sent, [r])
    return s, result


def metrics(**m):
    return lambda content: content.__setitem__("metrics", MetricRecord({"num-examples": 10, "train-loss": 1.0} | m))


@pytest.mark.parametrize("edit, reason", [
    (metrics(**{"num-examples": math.nan}), "num-examples must be a whole number, got nan"),
    (metrics(**{"num-examples": math.inf}), "num-examples must be a whole number, got inf"),
    (metrics(**{"num-examples": 1e15}), "num-examples must be between 1 and 10000000, got 1000000000000000"),
    (metrics(**{"num-examples": 0}), "num-examples must be between 1"),
    (metrics(**{"num-examples": 2.5}), "num-examples must be a whole number, got 2.5"),
    (metrics(**{"train-loss": math.nan}), "metric 'train-loss' is nan"),
    (metrics(**{"seconds": -math.inf}), "metric 'seconds' is -inf"),
    (lambda c: c.__delitem__("metrics"), "reply lacks 'metrics'"),
    (lambda c: c["config"].__setitem__("rank", "eight"), "malformed reply (ValueError"),
    (lambda c: c["config"].__setitem__("codec", "zstd"), "site site-3: delta uses unknown codec 'zstd'"),
    (lambda c: c["config"].__setitem__("codec", "int8"), "site site-3: "),
])
def test_malformed_train_reply_is_that_replys_rejection(edit, reason):
    s, result = one_reply(content_edit=edit)
    assert result.participation[0]["status"] == "rejected", result.participation
    assert reason in result.rejections[0]["reason"], result.rejections[0]["reason"]
    assert "\n" not in result.rejections[0]["reason"] and "medicine" not in s.experts


def test_a_delta_missing_a_module_is_rejected():
    def drop(d: LoraDelta) -> LoraDelta:
        return LoraDelta({k: v for k, v in d.tensors.items() if not k.startswith("m.v_proj")}, d.rank, d.alpha, "fp")

    _, result = one_reply(delta_edit=drop)
    assert result.participation[0]["status"] == "rejected"
    assert "module 'm.v_proj' missing (expected 2 modules, got 1)" in result.rejections[0]["reason"]


def test_the_cap_on_examples_is_a_config_option():
    _, result = one_reply(content_edit=metrics(**{"num-examples": 500}), max_examples=100)
    assert "num-examples must be between 1 and 100, got 500" in result.rejections[0]["reason"]
    _, result = one_reply(content_edit=metrics(**{"num-examples": 500}))
    assert result.participation[0]["status"] == "ok"


# -- end to end: a hostile describe reply and a malformed train reply, the run finishes --------

class SitesGrid:
    """The grid as `run_federation` sees it: node n answers describe with `infos[n]` and
    trains like a site (a seeded step from what it was sent); `bad_train` nodes answer
    train with NaN num-examples."""

    def __init__(self, infos: dict[int, dict], bad_train=()):
        self.infos, self.bad_train, self.ready = infos, set(bad_train), {}

    def get_node_ids(self):
        return list(self.infos)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid4())
            node = m.metadata.dst_node_id
            if m.metadata.message_type == "query.describe":
                r = Message(RecordDict({"config": ConfigRecord(self.infos[node])}), reply_to=m)
            else:
                d = LoraDelta.from_records(m.content["arrays"], m.content["config"])
                g = torch.Generator().manual_seed(node)
                d = LoraDelta({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in d.tensors.items()}, d.rank, d.alpha,
                              d.base_fingerprint)
                arrays, meta = d.to_records()
                n = math.nan if node in self.bad_train else 10
                r = Message(RecordDict({"arrays": arrays, "config": meta,
                                        "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})}), reply_to=m)
            self.ready[m.metadata.message_id] = r
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.ready.pop(i) for i in list(ids) if i in self.ready]


def test_hostile_describe_reply_cannot_write_outside_the_run_and_the_run_finishes(tmp_path, tiny_model_dir):
    from fedmoe.shared.modeling import model_fingerprint

    fp = model_fingerprint(tiny_model_dir)
    out = tmp_path / "a" / "b" / "run"
    victim = out.parent / "victim"  # where experts/../../victim would land
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("sentinel")
    infos = {1: {"site": "site-1", "domain": "law", "rank": 4, "fingerprint": fp, "num-examples": 10},
             2: {"site": "site-2", "domain": "../../victim", "rank": 4, "fingerprint": fp, "num-examples": 10},
             3: {"site": "site-3", "domain": "law", "rank": 4, "fingerprint": fp, "num-examples": 10}}
    plan = FederationPlan(str(tiny_model_dir), str(out), rounds=2, expected_nodes=3, node_wait=1, query_timeout=5,
                          strategy=StrategyConfig(local_steps=1, round_timeout=5))
    lines = []
    summary = run_federation(SitesGrid(infos, bad_train={3}), plan, progress=lines.append)
    assert summary["experts"] == ["law"]
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"] and (victim / "keep.txt").read_text() == "sentinel"
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["law"]
    store = RunStore(out, readonly=True)
    assert store.run()["state"] == "finished"
    rejections = store.rejections()
    describe = [r for r in rejections if r["round"] == 0]
    assert len(describe) == 1 and describe[0]["node_id"] == "2"
    assert "domain name '../../victim' is not allowed" in describe[0]["reason"] and "\n" not in describe[0]["reason"]
    assert any("node 2 refused" in line and "victim" in line for line in lines)
    train = [r for r in rejections if r["round"] > 0]
    assert {(r["round"], r["site"]) for r in train} == {(1, "site-3"), (2, "site-3")}
    assert all("num-examples must be a whole number, got nan" in r["reason"] for r in train)
    assert "site-2" not in {s["site"] for s in store.sites()}


def test_a_run_that_breaks_is_marked_failed_not_left_running(tmp_path, tiny_model_dir):
    class Broken(SitesGrid):
        def push_messages(self, messages):
            if messages[0].metadata.message_type == "train":
                raise RuntimeError("link lost")
            return super().push_messages(messages)

    from fedmoe.shared.modeling import model_fingerprint

    infos = {1: {"site": "site-1", "domain": "law", "rank": 4, "fingerprint": model_fingerprint(tiny_model_dir), "num-examples": 10}}
    plan = FederationPlan(str(tiny_model_dir), str(tmp_path), rounds=1, expected_nodes=1, node_wait=1, query_timeout=5,
                          strategy=StrategyConfig(local_steps=1, round_timeout=5))
    with pytest.raises(RuntimeError, match="link lost"):
        run_federation(Broken(infos), plan, progress=lambda _: None)
    assert RunStore(tmp_path, readonly=True).run()["state"] == "failed"


# -- files: a site's data that is not UTF-8, private keys -------------------------------------

def test_train_jsonl_that_is_not_utf8_is_one_line_naming_file_and_line(tmp_path):
    from fedmoe.shared.data import read_jsonl

    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(FedmoeError) as exc:
        read_jsonl(path)
    assert str(exc.value) == f"{path}:2: not UTF-8 (byte 0xe9 at column 16)"


def test_private_keys_are_never_readable_by_others_even_under_umask_0(tmp_path):
    import os
    import stat

    from fedmoe.server.ops.keys import _write_private

    old = os.umask(0)
    try:
        _write_private(tmp_path / "k.key", b"secret")
        _write_private(tmp_path / "k.key", b"secret2")  # rewriting keeps it so
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600 and (tmp_path / "k.key").read_bytes() == b"secret2"
    assert not list(tmp_path.glob("*.tmp"))


def test_reports_are_written_then_renamed(tmp_path):
    from fedmoe.shared.runs import write_atomically

    (tmp_path / "report.json").write_text("old")
    write_atomically(tmp_path / "report.json", "new")
    assert (tmp_path / "report.json").read_text() == "new" and not list(tmp_path.glob("*.tmp"))
