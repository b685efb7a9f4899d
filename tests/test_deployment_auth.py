"""An authenticated deployment on 127.0.0.1: TLS (the federation's own CA, `fedmoe keys
init`) and SuperNode authentication with registered site keys (`fedmoe keys site`,
`fedmoe coordinator start --enable-supernode-auth --site-public-key`), training with
`--privacy secagg` (Flower's SecAgg+ between the SuperLink and the SuperNodes).

Three sites start side by side. The one holding a key the coordinator never registered
is refused by the SuperLink (its log names the unknown key; the SuperNode gives up and
the site exits), and the run store never sees it. The two registered sites train the
run's one round through SecAgg+, and the round is committed. One federation serves both
tests (starting Flower's daemons is the slow part). (`--insecure` off loopback:
tests/test_site_daemon.py.)
"""

from __future__ import annotations

import os
import time

import pytest
from deploy_helpers import Proc, fedmoe, free_port

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 300.0
REGISTERED = {"site-00": "hospital-a", "site-01": "hospital-b"}  # data folder -> key name


@pytest.fixture(scope="module")
def auth_deployment(tmp_path_factory):
    from fedmoe.shared.pretrain import ensure_default_model
    from fedmoe.simulations.domain_suite import make_suite

    model = ensure_default_model()
    root = tmp_path_factory.mktemp("auth")
    suite = root / "suite"
    make_suite(suite, domains=1, sites=3, seed=0)
    keys = root / "keys"
    for args in (["init", "--host", "127.0.0.1"], *(["site", k] for k in REGISTERED.values()), ["site", "stranger"]):
        r = fedmoe("keys", *args, "--out", str(keys))
        assert r.returncode == 0, r.stderr
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_HOME=str(root / "flwr-home"))
    port, out = free_port(), root / "run"
    tls = ["--ssl-ca-certfile", str(keys / "ca.crt"), "--ssl-certfile", str(keys / "server.pem"), "--ssl-keyfile", str(keys / "server.key")]
    registered = [a for k in REGISTERED.values() for a in ("--site-public-key", str(keys / "sites" / f"{k}.pub"))]
    procs: list[Proc] = []

    def site(data: str, key: str) -> Proc:
        p = Proc(key, ["site", "start", "--superlink", f"127.0.0.1:{port}", "--data", str(suite / data), "--quant", "none",
                       "--rank", "4", "--model", str(model), "--root-certificates", str(keys / "ca.crt"),
                       "--auth-supernode-private-key", str(keys / "sites" / key), "--work-dir", str(root / f"work-{key}"),
                       "--threads", "1", "--max-retries", "2"], root, env)
        procs.append(p)
        return p

    try:
        started = time.monotonic()
        coord = Proc("coordinator", ["coordinator", "start", "--host", "127.0.0.1", "--port", str(port), *tls,
                                     "--enable-supernode-auth", *registered, "--privacy", "secagg", "--clip", "0.5",
                                     "--out", str(out), "--rounds", "1", "--expected-sites", "2", "--node-wait", "180",
                                     "--local-steps", "1", "--batch-size", "4", "--round-timeout", "120",
                                     "--model", str(model), "--timeout", str(RUN_TIMEOUT)], root, env)
        procs.append(coord)
        coord.wait_for(r"Successfully started run \d+", 120)  # the keys are registered before the run is submitted
        stranger = site("site-02", "stranger")
        sites = {key: site(data, key) for data, key in REGISTERED.items()}
        stranger_rc = stranger.popen.wait(120)
        coord_rc = coord.popen.wait(RUN_TIMEOUT + 60)
        print(f"authenticated secagg deployment: {time.monotonic() - started:.0f}s")
        yield {"out": out, "coord": coord, "coord_rc": coord_rc, "stranger": stranger, "stranger_rc": stranger_rc,
               "sites": sites, "still_up": {k: p.popen.poll() is None for k, p in sites.items()}}
    finally:
        for p in procs:
            p.stop()


def test_unregistered_site_is_refused(auth_deployment):
    from fedmoe.server.federation.run_store import RunStore

    d = auth_deployment
    assert d["stranger_rc"] == 1, d["stranger"].text()[-2000:]  # its SuperNode gave up; the site stopped
    assert "Failed to activate SuperNode" in d["stranger"].text()
    assert "No SuperNode found with the given public key" in (d["out"] / "superlink.log").read_text(errors="replace")
    store = RunStore(d["out"], readonly=True)
    try:
        assert [s["site"] for s in store.sites()] == sorted(REGISTERED)  # the stranger never reached the ServerApp
    finally:
        store.close()
    assert all(d["still_up"].values())  # the registered sites stay connected, ready for the next run


def test_registered_sites_train_through_secagg(auth_deployment):
    from fedmoe.server.federation.run_store import RunStore

    d = auth_deployment
    assert d["coord_rc"] == 0, d["coord"].text()[-3000:]
    text = d["coord"].text()
    assert "1/1 rounds committed" in text and "Secure aggregation completed" in text
    store = RunStore(d["out"], readonly=True)
    try:
        assert store.run()["state"] == "finished"
        rows = sorted(tuple(r) for r in store.db.execute("SELECT site, status FROM participation"))
        tolerance = [m["value"] for m in store.metrics("secagg_tolerance")]
    finally:
        store.close()
    assert rows == [(s, "ok") for s in sorted(REGISTERED)]
    assert tolerance and 0 < tolerance[0] < 1e-6
    assert (d["out"] / "experts").is_dir() and any((d["out"] / "experts").iterdir())
