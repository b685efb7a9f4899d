"""An authenticated deployment on 127.0.0.1: TLS (the federation's own CA, `fedmoe keys
init`) and SuperNode authentication with one registered site key (`fedmoe keys site`,
`fedmoe coordinator start --enable-supernode-auth --site-public-key`).

Two sites start side by side. The one holding a key the coordinator never registered is
refused by the SuperLink (its log names the unknown key; the SuperNode gives up and the
site exits); the registered one joins and trains the run's one round, and the run store
only ever saw the registered site. (`--insecure` off loopback: tests/test_site_daemon.py.)
"""

from __future__ import annotations

import os
import time

from deploy_helpers import Proc, fedmoe, free_port

RUN_TIMEOUT = 300.0


def test_unregistered_site_is_refused_and_registered_site_trains(tmp_path):
    from fedmoe.server.run_store import RunStore
    from fedmoe.shared.pretrain import ensure_default_model
    from fedmoe.simulations.domain_suite import make_suite

    model = ensure_default_model()
    suite = tmp_path / "suite"
    make_suite(suite, domains=1, sites=2, seed=0)
    keys = tmp_path / "keys"
    for args in (["init", "--host", "127.0.0.1"], ["site", "registered"], ["site", "stranger"]):
        r = fedmoe("keys", *args, "--out", str(keys))
        assert r.returncode == 0, r.stderr
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_HOME=str(tmp_path / "flwr-home"))
    port, out = free_port(), tmp_path / "run"
    tls = ["--ssl-ca-certfile", str(keys / "ca.crt"), "--ssl-certfile", str(keys / "server.pem"), "--ssl-keyfile", str(keys / "server.key")]
    procs: list[Proc] = []

    def site(name: str, data: str, key: str) -> Proc:
        p = Proc(name, ["site", "start", "--superlink", f"127.0.0.1:{port}", "--data", str(suite / data), "--quant", "none",
                        "--rank", "4", "--model", str(model), "--root-certificates", str(keys / "ca.crt"),
                        "--auth-supernode-private-key", str(keys / "sites" / key), "--work-dir", str(tmp_path / f"work-{name}"),
                        "--threads", "1", "--max-retries", "2"], tmp_path, env)
        procs.append(p)
        return p

    try:
        started = time.monotonic()
        coord = Proc("coordinator", ["coordinator", "start", "--host", "127.0.0.1", "--port", str(port), *tls,
                                     "--enable-supernode-auth", "--site-public-key", str(keys / "sites" / "registered.pub"),
                                     "--out", str(out), "--rounds", "1", "--expected-sites", "1", "--node-wait", "180",
                                     "--local-steps", "1", "--batch-size", "4", "--round-timeout", "120",
                                     "--model", str(model), "--timeout", str(RUN_TIMEOUT)], tmp_path, env)
        procs.append(coord)
        coord.wait_for(r"Successfully started run \d+", 120)  # the key is registered before the run is submitted

        stranger = site("stranger", "site-01", "stranger")
        registered = site("registered", "site-00", "registered")
        assert stranger.popen.wait(120) == 1, stranger.text()[-2000:]  # its SuperNode gave up; the site stopped
        assert "Failed to activate SuperNode" in stranger.text(), stranger.text()[-2000:]
        superlink_log = (out / "superlink.log").read_text(errors="replace")
        assert "No SuperNode found with the given public key" in superlink_log
        assert coord.popen.wait(RUN_TIMEOUT + 60) == 0, coord.text()[-3000:]
        print(f"authenticated deployment: {time.monotonic() - started:.0f}s")
        assert registered.popen.poll() is None  # still connected, ready for the next run
    finally:
        for p in procs:
            p.stop()

    assert "1/1 rounds committed" in coord.text()
    store = RunStore(out, readonly=True)
    try:
        assert store.run()["state"] == "finished"
        assert [s["site"] for s in store.sites()] == ["site-00"]  # the stranger never reached the ServerApp
        rows = store.db.execute("SELECT site, status FROM participation").fetchall()
    finally:
        store.close()
    assert [tuple(r) for r in rows] == [("site-00", "ok")]
