"""The dashboard's HTTP API and the gRPC OperatorService over a real run store: the same
state from both, `fedmoe status` printing it, live events, and every route and RPC
refused without the bearer token."""

from __future__ import annotations

import http.client
import io
import json
import math
import os
import shutil
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import grpc
import pytest

from fedmoe.server.ops.dashboard import checkpoint_norms, start_dashboard
from fedmoe.server.ops.operator_service import OperatorClient, start_operator_server
from fedmoe.server.federation.run_store import RunStore

from deploy_helpers import fedmoe_daemon  # tests/ is on sys.path under pytest

TOKEN = "test-token-0123456789"
ROUTES = ["/", "/index.html", "/static/dashboard.js", "/static/dashboard.css", "/static/plotly.min.js", "/favicon.ico",
          "/api/run", "/api/rounds", "/api/sites", "/api/experts", "/api/accuracy", "/api/privacy", "/api/rejections",
          "/api/loss", "/api/events", "/no/such/page"]


pytestmark = pytest.mark.slow  # they read the smoke run (a whole federation) unless FEDMOE_SMOKE_RUN names one


@pytest.fixture(scope="module")
def run_dir(request) -> Path:
    """The shared smoke run (read-only here). FEDMOE_SMOKE_RUN=DIR reuses a run folder you already have."""
    return Path(os.environ["FEDMOE_SMOKE_RUN"]) if os.environ.get("FEDMOE_SMOKE_RUN") else request.getfixturevalue("smoke_run")


@pytest.fixture(scope="module")
def servers(run_dir):
    dash = start_dashboard(run_dir, token=TOKEN)
    op = start_operator_server(run_dir, token=TOKEN)
    yield dash, op
    dash.stop()
    op.stop()


def live_copy(run_dir: Path, dest: Path, total_rounds: int = 4) -> Path:
    """A copy of the finished run, turned back into a running one with more rounds to go."""
    shutil.copytree(run_dir, dest)
    store = RunStore(dest)
    with store.db:
        config = json.loads(store.run()["config"])
        store.db.execute("UPDATE run SET state = 'running', finished = NULL, config = ?",
                         (json.dumps(config | {"rounds": total_rounds}),))
    store.close()
    return dest


def add_round(run_dir: Path, rnd: int, loss: float, reject: bool = False) -> None:
    """Commit one more round the way the ServerApp does (RunStore, same process layout)."""
    store = RunStore(run_dir)
    sites = store.sites()
    store.begin_round(rnd)
    experts = sorted({s["domain"] for s in sites})
    participation = [{"site": s["site"], "node_id": s["node_id"], "expert": s["domain"], "status": "ok", "loss": loss, "num_examples": 10,
                      "bytes_in": 1000, "bytes_out": 2000, "seconds": 1.0} for s in sites]
    rejections = [{"site": sites[0]["site"], "node_id": sites[0]["node_id"], "expert": sites[0]["domain"], "reason": "update norm 1e9 exceeds bound"}] if reject else []
    store.commit_round(rnd, participation, {e: {"train_loss": loss, "update_norm": 1.0, "sites_ok": 2, "sites_failed": 0} for e in experts},
                       rejections, {e: store.checkpoint(e) for e in experts})
    store.close()


def http_get(url: str, path: str, headers: dict | None = None, method: str = "GET",
             ca: str | None = None) -> tuple[int, "http.client.HTTPMessage", bytes]:
    """One request; the headers come back as a case-insensitive mapping. An https URL is
    checked against the CA certificate file `ca`."""
    host, port = url.split("//")[1].strip("/").rsplit(":", 1)
    if url.startswith("https:"):
        import ssl

        conn = http.client.HTTPSConnection(host, int(port), timeout=10, context=ssl.create_default_context(cafile=ca))
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        # the event stream never ends: read only what is there
        body = resp.read(200) if resp.getheader("Content-Type", "").startswith("text/event-stream") else resp.read()
        return resp.status, resp.headers, body
    finally:
        conn.close()


def api(dash, path: str):
    status, _, body = http_get(dash.url, path, {"Authorization": f"Bearer {dash.token}"})
    assert status == 200, (path, body[:300])
    return json.loads(body)


def run_cli(*argv: str) -> tuple[int, str]:
    from fedmoe.shared.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(list(argv))
    return rc, buf.getvalue()


# -- refusal without the token ------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Cookie": "fedmoe_token=wrong"}], ids=["none", "wrong", "not-bearer", "bad-cookie"])
def test_every_http_route_refuses_without_token(servers, headers):
    dash, _ = servers
    for path in ROUTES + ["/?token=wrong", "/api/run?token="]:
        status, hdrs, body = http_get(dash.url, path, headers)
        assert status == 401, path
        assert hdrs.get("WWW-Authenticate", "").startswith("Bearer"), path
        assert TOKEN.encode() not in body
    for method in ("POST", "PUT", "DELETE"):
        assert http_get(dash.url, "/api/run", headers, method=method)[0] == 401
    # a browser asking for the page gets a readable refusal
    status, _, body = http_get(dash.url, "/", headers | {"Accept": "text/html"})
    assert status == 401 and b"401 Unauthorized" in body


def test_token_by_header_query_and_cookie(servers):
    dash, _ = servers
    status, hdrs, body = http_get(dash.url, "/", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and b"/static/plotly.min.js" in body and b"cdn" not in body.lower()
    status, hdrs, _ = http_get(dash.url, f"/?token={TOKEN}")
    assert status == 200
    cookie = hdrs["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, _, js = http_get(dash.url, "/static/plotly.min.js", {"Cookie": cookie.split(";")[0]})
    assert status == 200 and len(js) > 1_000_000  # the whole library, served from the local plotly wheel
    status, hdrs, body = http_get(dash.url, "/api/events", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and hdrs["Content-Type"] == "text/event-stream"
    # read-only: writes are refused even with the token
    assert http_get(dash.url, "/api/run", {"Authorization": f"Bearer {TOKEN}"}, method="POST")[0] == 405


def test_every_rpc_refuses_without_token(servers):
    _, op = servers
    from fedmoe.protos import operator_pb2 as pb
    from fedmoe.protos import operator_pb2_grpc as pb_grpc

    with grpc.insecure_channel(op.address) as channel:
        stub = pb_grpc.OperatorServiceStub(channel)
        calls = [(stub.GetRun, pb.GetRunRequest()), (stub.ListRounds, pb.ListRoundsRequest()),
                 (stub.ListSites, pb.ListSitesRequest())]
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]:
            for fn, req in calls:
                with pytest.raises(grpc.RpcError) as err:
                    fn(req, metadata=metadata, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                next(iter(stub.WatchEvents(pb.WatchEventsRequest(), metadata=metadata, timeout=10)))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.GetRun(pb.GetRunRequest(), metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10).state == "finished"


# -- the same state everywhere ------------------------------------------------------------------

def test_status_prints_what_the_dashboard_shows(servers, run_dir):
    dash, op = servers
    rc, out = run_cli("status", "--addr", op.address, "--token", TOKEN, "--json")
    assert rc == 0
    status = json.loads(out)
    assert status["run"] == api(dash, "/api/run")
    assert status["rounds"] == api(dash, "/api/rounds")
    assert status["sites"] == api(dash, "/api/sites")
    run = status["run"]
    store = RunStore(run_dir, readonly=True)
    try:
        assert run["state"] == "finished" and run["committed_rounds"] == store.last_committed_round() == run["total_rounds"]
        assert [s["site"] for s in status["sites"]] == [s["site"] for s in store.sites()]
        loss = {(m["round"], m["expert"]): m["value"] for m in store.metrics("train_loss")}
        assert {(r["round"], e["expert"]): e["metrics"]["train_loss"] for r in status["rounds"] for e in r["experts"]} == loss
        assert all(s["rounds_joined"] == run["total_rounds"] and s["bytes_sent"] > 0 for s in status["sites"])
    finally:
        store.close()
    rc, table = run_cli("status", "--addr", op.address, "--token", TOKEN)
    assert rc == 0 and "finished" in table and all(s["site"] in table for s in status["sites"])
    rc, _ = run_cli("status", "--addr", op.address, "--token", "wrong")
    assert rc == 2


def test_per_layer_norms_match_dense_update(servers, run_dir):
    import torch

    experts = api(servers[0], "/api/experts")
    assert experts["layers"] and {e["expert"] for e in experts["experts"]} >= {"law", "medicine"}
    store = RunStore(run_dir, readonly=True)
    try:
        for item in experts["experts"]:
            assert "error" not in item, item.get("error")
            delta = store.checkpoint(item["expert"])
            assert math.isclose(item["total_norm"], delta.update_norm(), rel_tol=1e-9)
            module = delta.modules()[0]
            a, b = (t.double() for t in delta.factors(module))
            dense = float(torch.linalg.matrix_norm(delta.scaling * (b @ a)))
            assert math.isclose(item["modules"][module], dense, rel_tol=1e-6)
            layer_sq = sum(v * v for v in item["layers"].values())
            assert math.isclose(layer_sq, item["total_norm"] ** 2, rel_tol=1e-9)
    finally:
        store.close()
    # per-round accuracy: the sites' evaluation of each expert every round; final ones from report.json
    acc = api(servers[0], "/api/accuracy")
    report = json.loads((run_dir / "report.json").read_text())
    per_round = acc["per_round"]
    assert set(per_round) >= {"law", "medicine"}
    for points in per_round.values():
        assert [r for r, _ in points] == list(range(1, report["rounds"] + 1)) and all(0 <= v <= 1 for _, v in points)
    assert acc["final"]["experts_oracle"]["mixed"] == report["methods"]["experts_oracle"]["mixed"]


def test_live_events_eta_and_rejections(run_dir, tmp_path):
    live = live_copy(run_dir, tmp_path / "live", total_rounds=4)
    op = start_operator_server(live, token=TOKEN, poll_interval=0.1)
    dash = start_dashboard(live, token=TOKEN, poll_interval=0.1)
    client = OperatorClient(op.address, TOKEN)
    try:
        before = client.run()
        assert before["state"] == "running" and before["total_rounds"] == 4 and before["eta_seconds"] is not None
        events: list[dict] = []
        watcher = threading.Thread(target=lambda: events.extend(client.watch(timeout=20)), daemon=True)
        watcher.start()
        deadline = time.monotonic() + 10
        while not events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert events and events[0]["kind"] == "snapshot" and events[0]["overview"]["state"] == "running"
        add_round(live, 3, loss=0.5, reject=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not {"round_committed", "rejection"} <= {e["kind"] for e in events}:
            time.sleep(0.05)
        kinds = [e["kind"] for e in events]
        assert "round_started" in kinds and "round_committed" in kinds and "rejection" in kinds, kinds
        assert next(e for e in events if e["kind"] == "round_committed")["round"] == 3
        after = client.run()
        assert after["committed_rounds"] == 3 and after["rejections"] == before["rejections"] + 1
        committed = [r for r in client.rounds() if r["state"] == "committed"]
        mean = sum(r["finished"] - r["started"] for r in committed) / len(committed)
        assert math.isclose(after["eta_seconds"], mean, rel_tol=1e-6)  # one round of four left
        shown = api(dash, "/api/run")
        assert shown == after | {"elapsed_seconds": shown["elapsed_seconds"]}
        rejected = [s for s in api(dash, "/api/sites") if s["rejections"]]
        assert len(rejected) == 1
        assert api(dash, "/api/rejections")[-1]["reason"].startswith("update norm")
        store = RunStore(live)
        store.finish_run()
        store.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e["kind"] == "run_state" for e in events):
            time.sleep(0.05)
        assert any(e["kind"] == "run_state" and e["state"] == "finished" for e in events)
        assert client.run()["eta_seconds"] is None
    finally:
        client.close()
        op.stop()
        dash.stop()


def test_waiting_for_a_run_that_has_not_started(tmp_path):
    with start_dashboard(tmp_path, token=TOKEN) as dash:
        run = api(dash, "/api/run")
        assert run["state"] == "waiting" and run["current_round"] == 0
        assert api(dash, "/api/sites") == [] and api(dash, "/api/rounds") == []
        assert api(dash, "/api/experts")["experts"] == []


def test_checkpoint_norms_reject_bad_metadata(tmp_path):
    from safetensors.numpy import save_file

    import numpy as np

    from fedmoe.shared.errors import FedmoeError

    save_file({"m.lora_A.weight": np.ones((2, 3), np.float32), "m.lora_B.weight": np.ones((4, 2), np.float32)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(FedmoeError, match="lacks 'rank'"):
        checkpoint_norms(tmp_path / "x.safetensors")


def test_dashboard_command(run_dir):
    """`fedmoe dashboard` prints the token once, serves both APIs, and stops cleanly on SIGTERM."""
    with fedmoe_daemon("dashboard", "--run", str(run_dir), "--http-port", "0", "--grpc-port", "0", "--json",
                       check_exit=True) as info:
        assert info["dashboard"].startswith("http://127.0.0.1:") and info["operator_api"].startswith("127.0.0.1:")
        assert len(info["token"]) >= 24
        assert http_get(info["dashboard"], "/api/run")[0] == 401
        assert http_get(info["dashboard"], "/api/run", {"Authorization": f"Bearer {info['token']}"})[0] == 200
        client = OperatorClient(info["operator_api"], info["token"])
        assert client.run()["state"] == "finished"
        client.close()
