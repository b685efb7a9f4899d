"""Deployment on real daemons: `fedmoe coordinator start` (a SuperLink + our ServerApp)
and two `fedmoe site start` (site daemon + SuperNode) on 127.0.0.1.

One federation serves both tests (starting Flower's daemons is the slow part): two
rounds, both sites train in round 1; in round 2 one site's SuperNode is SIGKILLed while
its daemon trains, and the run must still commit round 2 by its round deadline and
end. Every process runs in its own session and is killed (whole tree) at teardown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from deploy_helpers import Proc, coordinator_args, deployment_root, free_port, site_args


pytestmark = pytest.mark.slow  # real SuperLink + SuperNodes + site daemons: the full suite, not the quick tier

ROUND_TIMEOUT = 60.0  # the killed site's round ends by this deadline (or earlier, when Flower sees the node gone)
RUN_TIMEOUT = 420.0


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    model, root, suite, env = deployment_root(tmp_path_factory, "deploy", domains=2, sites=2)
    port = free_port()
    out = root / "run"
    procs: list[Proc] = []
    try:
        started = time.monotonic()
        coord = Proc("coordinator", coordinator_args(port, out, model, rounds=2, sites=2, round_timeout=ROUND_TIMEOUT,
                                                     timeout=RUN_TIMEOUT), root, env)
        procs.append(coord)
        sites = {}
        for name in ("site-00", "site-01"):
            sites[name] = Proc(name, site_args(port, suite / name, model, root / f"work-{name}", "--insecure"), root, env)
            procs.append(sites[name])
        victim = sites["site-01"]
        # Mid-round: the victim's daemon has received round 2's TRAIN and is training.
        victim.wait_for(r"train: run \d+ round 2 ", RUN_TIMEOUT)
        supernode_pid = int(victim.wait_for(r"SuperNode \(pid (\d+)\)", 5).group(1))
        killed_at = time.monotonic()
        os.killpg(supernode_pid, signal.SIGKILL)  # the SuperNode, its SuperExec and the ClientApp in flight
        victim_rc = victim.popen.wait(60)
        coord_rc = coord.popen.wait(RUN_TIMEOUT + 60)
        finished = time.monotonic()
        yield {"out": out, "coord": coord, "coord_rc": coord_rc, "sites": sites, "victim_rc": victim_rc,
               "after_kill": finished - killed_at, "wall": finished - started, "root": root, "suite": suite}
    finally:
        for p in procs:
            p.stop()


def test_two_sites_two_rounds(deployment):
    from fedmoe.server.federation.run_store import RunStore
    from fedmoe.shared.modeling import load_adapter, load_base_model

    d = deployment
    assert d["coord_rc"] == 0, d["coord"].text()[-3000:]
    assert re.search(r"2/2 rounds committed", d["coord"].text())
    store = RunStore(d["out"], readonly=True)
    try:
        assert store.run()["state"] == "finished"
        assert [r["state"] for r in store.rounds()] == ["committed", "committed"]
        assert len(store.sites()) == 2, "\n".join(p.tail() for p in d["sites"].values())
        rows = store.db.execute("SELECT round, expert, status FROM participation ORDER BY round, expert").fetchall()
    finally:
        store.close()
    assert [tuple(r) for r in rows if r[0] == 1] == [(1, "law", "ok"), (1, "medicine", "ok")]
    model = load_base_model(_model_dir(), "none")
    for expert in ("law", "medicine"):
        path = d["out"] / "experts" / expert
        assert (path / "adapter_model.safetensors").is_file()
        model = load_adapter(model, path, adapter_name=expert)
    assert set(model.peft_config) >= {"law", "medicine"}

    # The audit log says what left the site: shapes and checksums, never the data.
    audit = [json.loads(l) for l in (d["root"] / "work-site-00" / "audit.jsonl").read_text().splitlines()]
    trains = [a for a in audit if a["message"] == "train"]
    assert [a["round"] for a in trains] == [1, 2] and all(len(a["sent"]["sha256"]) == 64 for a in trains)
    assert all(t["bytes"] > 0 and t["shape"] for a in trains for t in a["sent"]["tensors"])
    text = (d["root"] / "work-site-00" / "audit.jsonl").read_text()
    first = json.loads((d["suite"] / "site-00" / "train.jsonl").read_text().splitlines()[0])
    assert (first.get("prompt") or first.get("text")) not in text


def _model_dir() -> Path:
    from fedmoe.shared.pretrain import ensure_default_model

    return ensure_default_model()


def test_site_killed_mid_round_does_not_hang(deployment):
    from fedmoe.server.federation.run_store import RunStore

    d = deployment
    # The site supervisor noticed its SuperNode died and stopped (daemon included).
    assert d["victim_rc"] == 1, d["sites"]["site-01"].text()[-2000:]
    # Round 2 ended by its deadline: the run finished instead of waiting for the dead site.
    assert d["after_kill"] < ROUND_TIMEOUT + 60, d["after_kill"]
    store = RunStore(d["out"], readonly=True)
    try:
        rows = {(r["round"], r["expert"]): dict(r) for r in store.db.execute("SELECT * FROM participation")}
    finally:
        store.close()
    assert rows[(2, "medicine")]["status"] == "ok"
    assert rows[(2, "law")]["status"] == "failed" and rows[(2, "law")]["reason"]
    # The survivor is still up, ready for the next run.
    assert d["sites"]["site-00"].popen.poll() is None
