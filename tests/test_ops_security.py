"""The operator-facing servers' hardening: the dashboard on uvicorn (idle and slow
connections closed, bounded, HTTPS), the operator API over TLS with bounded threads,
the one-line refusal of a non-loopback host without TLS, and where the token comes from.
Fast: a small run store made here, servers on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from pathlib import Path

import grpc
import pytest

from fedmoe.server.ops.access import TLSFiles
from fedmoe.server.ops.dashboard import start_dashboard
from fedmoe.server.ops.operator_service import OperatorClient, start_operator_server
from fedmoe.shared.cli import build_parser, main
from fedmoe.shared.errors import FedmoeError

from deploy_helpers import fedmoe_daemon  # noqa: E402 (tests/ is on sys.path under pytest)
from test_operator_api import http_get  # noqa: E402

TOKEN = "ops-test-token-0123456789"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    from fedmoe.server.ops.keys import make_ca_and_server_cert

    return make_ca_and_server_cert(tmp_path_factory.mktemp("keys"), ["127.0.0.1", "localhost"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from fedmoe.server.federation.run_store import RunStore

    out = tmp_path_factory.mktemp("run")
    store = RunStore(out)
    store.start_run("test", 3, {"rounds": 2})
    store.close()
    return out


def tls_of(certs) -> TLSFiles:
    return TLSFiles(certs["certfile"], certs["keyfile"])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedmoe: error: ") and "\n" not in err, err
    return err


# -- idle and slow connections ------------------------------------------------------------------------

def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `sock` (reading EOF), None if still open after `seconds`."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return time.monotonic() - start
    except (socket.timeout, TimeoutError):
        return None
    except ConnectionResetError:
        return time.monotonic() - start


def test_idle_sockets_neither_pin_threads_nor_block_a_request_and_are_closed(run_dir):
    with start_dashboard(run_dir, token=TOKEN, idle_timeout=1.5, max_connections=64) as dash:
        threads_before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", dash.port), timeout=5) for _ in range(50)]
        # slow-loris: a request head trickled a byte at a time never completes
        slow = socket.create_connection(("127.0.0.1", dash.port), timeout=5)
        stop_trickle = threading.Event()

        def trickle():
            for ch in b"GET /api/run HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100:
                if stop_trickle.wait(0.2):
                    return
                try:
                    slow.send(bytes([ch]))
                except OSError:
                    return

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        try:
            time.sleep(0.3)
            started = time.monotonic()
            status, _, body = http_get(dash.url, "/api/run", {"Authorization": f"Bearer {TOKEN}"})
            assert status == 200 and json.loads(body)["state"] == "running"
            assert time.monotonic() - started < 1.0  # answered at once, beside 51 open sockets
            assert threading.active_count() - threads_before < 5  # no thread per connection
            # never-used sockets and the trickling one are closed after the idle timeout, not before
            assert closed_within(idle[0], 0.5) is None
            waited = [closed_within(s, 4.0) for s in idle[:5] + [slow]]
            assert all(w is not None for w in waited), waited
            assert all(closed_within(s, 1.0) is not None for s in idle[5:])
        finally:
            stop_trickle.set()
            for s in idle + [slow]:
                s.close()
        # a kept-alive connection is closed once idle, too
        conn = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=5)
        conn.request("GET", "/api/run", headers={"Authorization": f"Bearer {TOKEN}"})
        assert conn.getresponse().read() and conn.sock is not None
        assert closed_within(conn.sock, 4.0) is not None
        conn.close()


def test_connections_beyond_the_bound_get_503_until_idle_ones_are_closed(run_dir):
    with start_dashboard(run_dir, token=TOKEN, idle_timeout=1.0, max_connections=4) as dash:
        held = [socket.create_connection(("127.0.0.1", dash.port), timeout=5) for _ in range(4)]
        try:
            time.sleep(0.2)
            assert http_get(dash.url, "/api/run", {"Authorization": f"Bearer {TOKEN}"})[0] == 503
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the held sockets time out; service comes back by itself
                time.sleep(0.3)
                if http_get(dash.url, "/api/run", {"Authorization": f"Bearer {TOKEN}"})[0] == 200:
                    break
            else:
                pytest.fail("the dashboard did not recover after idle connections timed out")
        finally:
            for s in held:
                s.close()


# -- TLS ------------------------------------------------------------------------------------------------

def test_tls_dashboard_answers_https_with_the_ca_and_refuses_plain_http(run_dir, certs):
    with start_dashboard(run_dir, token=TOKEN, tls=tls_of(certs)) as dash:
        assert dash.url.startswith("https://127.0.0.1:")
        status, hdrs, body = http_get(dash.url, "/api/run", {"Authorization": f"Bearer {TOKEN}"}, ca=certs["ca_certfile"])
        assert status == 200 and json.loads(body)["state"] == "running"
        assert http_get(dash.url, "/api/run", ca=certs["ca_certfile"])[0] == 401
        status, hdrs, _ = http_get(dash.url, f"/?token={TOKEN}", ca=certs["ca_certfile"])
        assert status == 200 and "Secure" in hdrs["Set-Cookie"] and "HttpOnly" in hdrs["Set-Cookie"]
        # without the federation's CA the certificate is not trusted
        with pytest.raises(ssl.SSLCertVerificationError):
            http_get(dash.url, "/api/run", ca=None)
        # plain HTTP to the TLS port gets no answer
        plain = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=5)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/api/run", headers={"Authorization": f"Bearer {TOKEN}"})
            plain.getresponse().read()
        plain.close()


def test_operator_api_over_tls_needs_the_token(run_dir, certs):
    from fedmoe.protos import operator_pb2 as pb
    from fedmoe.protos import operator_pb2_grpc as pb_grpc

    with start_operator_server(run_dir, token=TOKEN, tls=tls_of(certs)) as op:
        client = OperatorClient(op.address, TOKEN, tls_ca=certs["ca_certfile"])
        assert client.run()["state"] == "running"
        client.close()
        creds = grpc.ssl_channel_credentials(Path(certs["ca_certfile"]).read_bytes())
        with grpc.secure_channel(op.address, creds) as channel:
            stub = pb_grpc.OperatorServiceStub(channel)
            for metadata in [(), (("authorization", "Bearer wrong"),)]:
                with pytest.raises(grpc.RpcError) as err:
                    stub.GetRun(pb.GetRunRequest(), metadata=metadata, timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = OperatorClient(op.address, "wrong", tls_ca=certs["ca_certfile"])
        with pytest.raises(FedmoeError, match="UNAUTHENTICATED"):
            wrong.run()
        wrong.close()
        plain = OperatorClient(op.address, TOKEN, timeout=3)  # plaintext to a TLS port: no answer
        with pytest.raises(FedmoeError, match="UNAVAILABLE"):
            plain.run()
        plain.close()


def test_status_over_tls_with_the_token_from_a_file(run_dir, certs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FEDMOE_OPERATOR_TOKEN", raising=False)
    (tmp_path / "token").write_text(TOKEN + "\n")
    with start_operator_server(run_dir, token=TOKEN, tls=tls_of(certs)) as op:
        assert main(["status", "--addr", op.address, "--tls-ca", certs["ca_certfile"], "--token-file",
                     str(tmp_path / "token"), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["run"]["state"] == "running"
        monkeypatch.setenv("FEDMOE_OPERATOR_TOKEN", TOKEN)
        assert main(["status", "--addr", op.address, "--tls-ca", certs["ca_certfile"], "--token", "wrong"]) == 0
        capsys.readouterr()


def test_operator_watches_are_bounded_and_calls_still_answered(run_dir):
    from fedmoe.protos import operator_pb2 as pb
    from fedmoe.protos import operator_pb2_grpc as pb_grpc

    with start_operator_server(run_dir, token=TOKEN, max_workers=4, maximum_concurrent_rpcs=8, poll_interval=0.1) as op:
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        with grpc.insecure_channel(op.address) as channel:
            stub = pb_grpc.OperatorServiceStub(channel)
            watches = [stub.WatchEvents(pb.WatchEventsRequest(), metadata=metadata, timeout=20) for _ in range(2)]
            assert all(next(w).kind == "snapshot" for w in watches)  # both hold a worker thread now
            with pytest.raises(grpc.RpcError) as err:
                next(stub.WatchEvents(pb.WatchEventsRequest(), metadata=metadata, timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.GetRun(pb.GetRunRequest(), metadata=metadata, timeout=5).state == "running"
            for w in watches:
                w.cancel()
            deadline = time.monotonic() + 5  # a cancelled watch gives its slot back
            while time.monotonic() < deadline:
                try:
                    w = stub.WatchEvents(pb.WatchEventsRequest(), metadata=metadata, timeout=10)
                    assert next(w).kind == "snapshot"
                    w.cancel()
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    time.sleep(0.2)
            else:
                pytest.fail("watch slots were not released")


# -- refusals and where the token comes from ---------------------------------------------------------

@pytest.mark.parametrize("argv,flag", [
    (["dashboard", "--run", "{run}", "--host", "0.0.0.0", "--http-port", "0", "--grpc-port", "0"], "--host 0.0.0.0"),
    (["dashboard", "--run", "{run}", "--host", "10.1.2.3", "--http-port", "-1", "--grpc-port", "0"], "--host 10.1.2.3"),
    (["coordinator", "start", "--out", "{run}/x", "--insecure", "--dashboard-host", "0.0.0.0", "--http-port", "0"],
     "--dashboard-host 0.0.0.0"),
    (["serve", "--run", "{run}", "--grpc-port", "0", "--dashboard-host", "::", "--dashboard-port", "0"], "--dashboard-host ::"),
], ids=["dashboard", "operator-only", "coordinator", "serve"])
def test_a_non_loopback_host_without_tls_is_a_one_line_error(argv, flag, run_dir, capsys):
    assert main([a.replace("{run}", str(run_dir)) for a in argv]) == 2
    err = one_line_error(capsys)
    assert f"{flag} is not loopback" in err and "tls-cert" in err
    assert not (run_dir / "x").exists()  # the coordinator refused before it started anything


def test_bad_tls_flags_are_one_line_errors(run_dir, certs, tmp_path, capsys):
    base = ["dashboard", "--run", str(run_dir), "--http-port", "0", "--grpc-port", "0"]
    assert main(base + ["--tls-cert", certs["certfile"]]) == 2
    assert "go together" in one_line_error(capsys)
    assert main(base + ["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", certs["keyfile"]]) == 2
    assert "--tls-cert" in one_line_error(capsys)
    (tmp_path / "junk.pem").write_text("not a certificate")
    assert main(base + ["--tls-cert", str(tmp_path / "junk.pem"), "--tls-key", certs["keyfile"]]) == 2
    assert "not a PEM file" in one_line_error(capsys)
    with pytest.raises(FedmoeError, match="not loopback"):
        start_dashboard(run_dir, host="0.0.0.0")
    with pytest.raises(FedmoeError, match="not loopback"):
        start_operator_server(run_dir, host="0.0.0.0")


def test_token_from_file_then_env_then_flag(tmp_path, monkeypatch, capsys):
    from fedmoe.server.commands.dashboard import operator_args

    def token(*extra):
        args = build_parser().parse_args(["dashboard", "--run", str(tmp_path), *extra])
        return operator_args(args).token

    monkeypatch.delenv("FEDMOE_OPERATOR_TOKEN", raising=False)
    (tmp_path / "token").write_text("from-file\n")
    assert token() is None  # none given: the server makes one
    assert token("--token", "from-flag") == "from-flag"
    monkeypatch.setenv("FEDMOE_OPERATOR_TOKEN", "from-env")
    assert token("--token", "from-flag") == "from-env"
    assert token("--token-file", str(tmp_path / "token"), "--token", "from-flag") == "from-file"
    (tmp_path / "empty").write_text("\n")
    assert main(["dashboard", "--run", str(tmp_path), "--token-file", str(tmp_path / "empty")]) == 2
    assert "--token-file" in one_line_error(capsys)
    assert main(["dashboard", "--run", str(tmp_path), "--token-file", str(tmp_path / "missing")]) == 2
    assert "No such file" in one_line_error(capsys)


def test_dashboard_command_with_tls_and_a_token_file(run_dir, certs, tmp_path):
    """`fedmoe dashboard` serving HTTPS + gRPC over TLS with the token from a file: the
    token is never printed, both answer with it, and SIGTERM stops it cleanly."""
    (tmp_path / "token").write_text(TOKEN)
    with fedmoe_daemon("dashboard", "--run", str(run_dir), "--http-port", "0", "--grpc-port", "0",
                       "--tls-cert", certs["certfile"], "--tls-key", certs["keyfile"],
                       "--token-file", str(tmp_path / "token"), "--json", check_exit=True) as info:
        assert TOKEN not in json.dumps(info)
        assert info["tls"] and info["dashboard"].startswith("https://127.0.0.1:") and "token" not in info
        ca = certs["ca_certfile"]
        assert http_get(info["dashboard"], "/api/run", ca=ca)[0] == 401
        assert http_get(info["dashboard"], "/api/run", {"Authorization": f"Bearer {TOKEN}"}, ca=ca)[0] == 200
        client = OperatorClient(info["operator_api"], TOKEN, tls_ca=ca)
        assert client.run()["state"] == "running"
        client.close()
