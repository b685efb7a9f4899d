"""Many sites (issue 18): a site's data is read when its message comes and not kept, the
strategy keeps one small record per site, the run store has the indexes its per-site and
per-round reads use, the dashboard's API lists one page, and the synthetic suite
generator spreads site sizes, seeded."""

from __future__ import annotations

import http.client
import json
import statistics
import tracemalloc
from pathlib import Path

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedmoe.shared.errors import FedmoeError


# -- the site: data read per message, at most SITE_CACHE_SIZE sites kept ---------------------------
def test_site_data_is_read_when_asked_and_not_kept(tmp_path):
    from fedmoe.client import site
    from fedmoe.simulations.domain_suite import make_suite

    make_suite(tmp_path, 2, 6, 0)
    site._sites.clear()
    settings = [site.SiteSettings(str(p)) for p in sorted(tmp_path.glob("site-*"))]
    for s in settings:
        assert site.site_data(s).path == Path(s.data_path)
    assert len(site._sites) == site.SITE_CACHE_SIZE  # six sites served, the last two kept
    assert [k[0] for k in site._sites] == [s.data_path for s in settings[-site.SITE_CACHE_SIZE:]]
    again = site.site_data(settings[-1])
    assert again is site._sites[(settings[-1].data_path, None)]  # the most recent is not re-read
    info = site.describe(settings[0])
    assert info["num-examples"] == len(site._sites[(settings[0].data_path, None)].train)
    assert len(site._sites) == site.SITE_CACHE_SIZE
    site._sites.clear()


def test_site_ref_reads_the_domain_not_the_records(tmp_path):
    from fedmoe.shared.data import site_ref
    from fedmoe.simulations.domain_suite import make_suite

    make_suite(tmp_path, 2, 2, 0)
    ref = site_ref(tmp_path / "site-01")
    site = ref.load()
    assert ref.name == "site-01" and ref.domain == site.domain and len(site.train) > 0
    (tmp_path / "site-00" / "train.jsonl").unlink()
    with pytest.raises(FedmoeError, match="data file not found: .*site-00/train.jsonl"):
        site_ref(tmp_path / "site-00")


# -- the strategy: O(1) per site beyond its Node ---------------------------------------------------
MODULES = {"m.q_proj": (16, 12), "m.v_proj": (16, 8)}


def strategy_after_rounds(n_sites: int, sampled_per_domain: int, rounds: int = 2):
    """A strategy of `n_sites` (two domains) after `rounds` rounds with every sampled site
    replying; returns it and the bytes Python holds for it, measured by tracemalloc."""
    from fedmoe.server.federation.strategy import DomainExpertStrategy, Node, StrategyConfig
    from fedmoe.shared.delta import AdapterSpec, LoraDelta

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cfg = StrategyConfig(fraction=sampled_per_domain / (n_sites // 2), min_nodes=sampled_per_domain)
    s = DomainExpertStrategy(cfg, AdapterSpec(MODULES), "fp", rounds=rounds)
    for i in range(n_sites):
        assert s.add_node(Node(i + 1, f"site-{i:04d}", ("law", "medicine")[i % 2], 4, "fp", 10 + i)) is None
    for rnd in range(1, rounds + 1):
        sent = s.configure_train(rnd)
        assert len(sent) == 2 * sampled_per_domain  # sampled, not all
        replies = []
        for k, (_, _, msg) in enumerate(sent):
            d = LoraDelta.from_records(msg.content["arrays"], msg.content["config"])
            g = torch.Generator().manual_seed(k)
            d = LoraDelta({n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in d.tensors.items()}, d.rank, d.alpha, "fp")
            arrays, meta = d.to_records()
            replies.append(Message(RecordDict({"arrays": arrays, "config": meta,
                                               "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0})}),
                                   reply_to=msg))
        result = s.aggregate_train(rnd, sent, replies)
        assert result.metrics["law"]["sites_ok"] == sampled_per_domain
        del sent, replies, result
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return s, held


@pytest.mark.usefixtures("flower_task_identity")
def test_strategy_state_per_site_is_one_small_record():
    strategy_after_rounds(10, 3)  # warm-up: first-call caches (torch, Flower) are not the strategy's
    small, held_small = strategy_after_rounds(10, 3)
    large, held_large = strategy_after_rounds(1000, 3)
    per_site = (held_large - held_small) / 990
    # measured ~220 bytes: a slotted Node, its site name and its dict entry; one adapter kept
    # per site (or a Node with a __dict__ and a few fields more) would exceed the bound
    assert per_site < 600, f"{per_site:.0f} bytes held per extra site"
    assert not hasattr(large.nodes[1], "__dict__")
    # nothing else in the strategy grows with the sites: experts and initial adapters are per domain / rank
    assert set(large.experts) == set(small.experts) == {"law", "medicine"}
    assert len(large._init) == len(small._init) == 1


# -- the run store's indexes ------------------------------------------------------------------------
def test_run_store_reads_per_site_and_per_round_use_indexes(tmp_path):
    import sqlite3

    from fedmoe.server.federation.run_store import RunStore

    # a run.db from before the indexes gains them when a RunStore opens it
    old = sqlite3.connect(tmp_path / "run.db")
    old.executescript("CREATE TABLE participation (round INTEGER, site TEXT, node_id TEXT, expert TEXT, status TEXT, "
                      "loss REAL, num_examples INTEGER, bytes_in INTEGER, bytes_out INTEGER, seconds REAL, reason TEXT);")
    old.close()
    store = RunStore(tmp_path)
    plans = {
        "SELECT * FROM participation WHERE round = ? ORDER BY round, site": "participation_by_round",
        "SELECT * FROM participation WHERE site = ?": "participation_by_site",
        "SELECT * FROM metrics WHERE round = ? AND expert = ?": "metrics_by_round",
        "SELECT * FROM metrics WHERE name = ? ORDER BY round": "metrics_by_name",
        "SELECT * FROM rejections WHERE round > ?": "rejections_by_round",
    }
    for query, index in plans.items():
        plan = " ".join(str(r[-1]) for r in store.db.execute("EXPLAIN QUERY PLAN " + query, (1, 2)[:query.count("?")]))
        assert index in plan, (query, plan)
    # the sites table's join reaches each site's participation rows through the site index
    plan = " ".join(str(r[-1]) for r in store.db.execute(
        "EXPLAIN QUERY PLAN SELECT s.site, COUNT(p.round) FROM sites s LEFT JOIN participation p ON p.site = s.site "
        "GROUP BY s.site"))
    assert "participation_by_site" in plan, plan
    store.close()


# -- the dashboard API: one page unasked, with a count ----------------------------------------------
def many_sites_run(run_dir: Path, n: int) -> None:
    from fedmoe.server.federation.run_store import RunStore

    store = RunStore(run_dir)
    store.start_run("test", 0, {"rounds": 1})
    with store.db:
        store.db.executemany("INSERT INTO sites VALUES (?, ?, 'law', 8, 'fp', 10, 0, 0)",
                             [(f"site-{i:04d}", str(i)) for i in range(n)])
        store.db.executemany("INSERT INTO rejections VALUES (?, ?, ?, 'law', ?)",
                             [(1 + i // 100, f"site-{i:04d}", str(i), f"reason {i}") for i in range(0, n, 2)])
    store.close()


def get(dash, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=10)
    conn.request("GET", path, headers={"Authorization": f"Bearer {dash.token}"})
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    return r.status, r.getheader("X-Total-Count"), body


def test_dashboard_api_lists_one_page_with_the_total(tmp_path):
    from fedmoe.server.ops.dashboard import MAX_PAGE_LIMIT, PAGE_LIMIT, RunView, start_dashboard

    many_sites_run(tmp_path, 1000)
    with start_dashboard(tmp_path, token="t" * 20) as dash:
        status, total, sites = get(dash, "/api/sites")
        assert status == 200 and total == "1000" and len(sites) == PAGE_LIMIT
        assert [s["site"] for s in sites[:2]] == ["site-0000", "site-0001"] and sites[0]["rejections"] == 1
        assert sites[1]["rejections"] == 0
        _, _, page = get(dash, "/api/sites?limit=5&offset=995")
        assert [s["site"] for s in page] == [f"site-{i:04d}" for i in range(995, 1000)]
        status, total, rej = get(dash, "/api/rejections?limit=3")
        assert total == "500" and [r["reason"] for r in rej] == ["reason 994", "reason 996", "reason 998"]  # newest, in order
        for bad in ("limit=0", f"limit={MAX_PAGE_LIMIT + 1}", "offset=-1", "limit=ten"):
            status, _, body = get(dash, f"/api/sites?{bad}")
            assert status == 400 and body["error"].startswith("?") and "\n" not in body["error"], body
    assert len(RunView(tmp_path).sites()) == 1000  # asked for all (fedmoe status, the operator API): all


# -- the synthetic suite's size skew ----------------------------------------------------------------
def test_suite_size_skew_is_lognormal_seeded_and_checked(tmp_path):
    from fedmoe.simulations.domain_suite import make_suite

    skewed = make_suite(tmp_path / "a", 2, 400, 7, size_skew=1.0)
    sizes = sorted(s["train"] for s in skewed["sites"])
    assert sizes[-1] / statistics.median(sizes) > 4 and sizes[-1] / sizes[0] > 20  # a long tail
    assert statistics.mean(sizes) == pytest.approx(statistics.mean(  # mean factor 1: about the unskewed volume
        s["train"] for s in make_suite(tmp_path / "flat", 2, 400, 7)["sites"]), rel=0.2)
    assert (tmp_path / "a" / "site-399" / "train.jsonl").is_file()  # names padded to sort at 100+ sites
    again = make_suite(tmp_path / "b", 2, 400, 7, size_skew=1.0)
    assert again == skewed
    for name in ("site-000", "site-123", "site-399"):
        assert (tmp_path / "a" / name / "train.jsonl").read_bytes() == (tmp_path / "b" / name / "train.jsonl").read_bytes()
    other = make_suite(tmp_path / "c", 2, 400, 8, size_skew=1.0)
    assert [s["train"] for s in other["sites"]] != [s["train"] for s in skewed["sites"]]
    for bad in (-0.5, 4.0):
        with pytest.raises(FedmoeError, match="--size-skew must be between 0 and 3"):
            make_suite(tmp_path / "d", 2, 4, 0, size_skew=bad)
