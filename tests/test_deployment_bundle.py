"""A site refuses a foreign app bundle on real daemons (127.0.0.1, `--insecure`).

`fedmoe coordinator start` runs fedmoe's federation with one `fedmoe site start`. While
it trains, someone on the coordinator machine submits their own app on its loopback
Control API (`flwr run` with the coordinator's own `OUT/flwr` connection, as any local
user could): its ServerApp runs on the coordinator (the documented limit) and sends the
site one message; the site's SuperNode refuses the bundle (one log line), the reply is
Flower's INVALID_FAB error, the foreign ClientApp never runs, and fedmoe's own run
trains to the end on the same site. (The check itself, case by case, is
tests/test_bundle_check.py.)
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from deploy_helpers import Proc, coordinator_args, deployment_root, foreign_app, free_port, site_args

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 300.0

FOREIGN_APP = """
import json, time
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

app = ServerApp()
client = ClientApp()

@client.query()
def leak(msg, context):
    Path({client_marker!r}).write_text("the foreign ClientApp ran on the site")
    return Message(RecordDict(), reply_to=msg)

@app.main()
def main(grid, context):
    nodes, deadline = [], time.time() + 120
    while not nodes and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes], timeout=120)
    out = [int(r.error.code) if r.has_error() else "ok" for r in replies]
    Path({server_marker!r}).write_text(json.dumps({{"nodes": len(nodes), "replies": out}}))
"""


@pytest.fixture(scope="module")
def foreign_submission(tmp_path_factory):
    model, root, suite, env = deployment_root(tmp_path_factory, "bundle", domains=1, sites=1)
    port, out = free_port(), root / "run"
    markers = {"server_marker": str(root / "foreign-serverapp.json"), "client_marker": str(root / "foreign-clientapp-ran")}
    app = foreign_app(root / "foreign-app", FOREIGN_APP.format(**markers))
    procs: list[Proc] = []
    try:
        started = time.monotonic()
        coord = Proc("coordinator", coordinator_args(port, out, model, rounds=1, sites=1, round_timeout=120,
                                                     timeout=RUN_TIMEOUT), root, env)
        procs.append(coord)
        own_run = coord.wait_for(r"Successfully started run (\d+)", 120).group(1)
        site = Proc("site", site_args(port, suite / "site-00", model, root / "work-site", "--insecure",
                                      "--poll-interval", "0.25"), root, env)
        procs.append(site)
        # Someone on the coordinator machine submits their app on the loopback Control API.
        submit = subprocess.run(["flwr", "run", str(app), "fedmoe"], capture_output=True, text=True, timeout=120,
                                env=dict(env, FLWR_HOME=str(out / "flwr")))
        assert submit.returncode == 0, submit.stdout + submit.stderr
        refused, client_marker = re.compile(r"fedmoe site: refused the app bundle of run (\d+) [^\n]*"), Path(markers["client_marker"])
        deadline = time.monotonic() + 150
        while not (refusal := refused.search(site.text())) and not client_marker.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        coord_rc = coord.popen.wait(RUN_TIMEOUT + 60)
        server_marker = Path(markers["server_marker"])
        deadline = time.monotonic() + 60
        while not server_marker.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"foreign bundle deployment: {time.monotonic() - started:.0f}s")
        yield {"coord": coord, "coord_rc": coord_rc, "site": site, "site_up": site.popen.poll() is None,
               "own_run": own_run, "refusal": refusal, "submit": submit.stdout + submit.stderr,
               "server_marker": server_marker, "client_marker": client_marker, "out": out}
    finally:
        for p in procs:
            p.stop()


def test_the_site_refuses_the_foreign_bundle_and_its_clientapp_never_runs(foreign_submission):
    d = foreign_submission
    assert not d["client_marker"].exists(), "the foreign ClientApp ran on the site"
    assert d["refusal"], d["site"].tail()
    line = d["refusal"].group(0)
    assert d["refusal"].group(1) != d["own_run"]
    assert "(its ClientApp does not run): extra file 'evil.py'" in line, line
    assert not d["client_marker"].exists()
    # The foreign ServerApp (which does run on the coordinator) got an error reply, no data.
    assert d["server_marker"].exists(), d["coord"].tail() + d["site"].tail()
    result = json.loads(d["server_marker"].read_text())
    from flwr.common.constant import ErrorCode

    assert result == {"nodes": 1, "replies": [ErrorCode.INVALID_FAB]}, result


def test_fedmoe_own_run_trains_on_the_same_site(foreign_submission):
    from fedmoe.server.federation.run_store import RunStore

    d = foreign_submission
    assert d["coord_rc"] == 0, d["coord"].text()[-3000:]
    assert "1/1 rounds committed" in d["coord"].text()
    store = RunStore(d["out"], readonly=True)
    try:
        assert store.run()["state"] == "finished"
        assert [tuple(r) for r in store.db.execute("SELECT site, status FROM participation")] == [("site-00", "ok")]
    finally:
        store.close()
    assert d["site_up"]  # still serving, ready for the next run
    assert d["site"].text().count("fedmoe site: refused") >= 1
    assert "refused the app bundle of run " + d["own_run"] not in d["site"].text()
