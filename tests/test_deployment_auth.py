"""An authenticated deployment on 127.0.0.1: TLS (the federation's own CA, `fedmoe keys
init`) and SuperNode authentication with registered site keys (`fedmoe keys site`,
`fedmoe coordinator start --enable-supernode-auth --site-public-key`), training with
`--privacy secagg` (Flower's SecAgg+ between the SuperLink and the SuperNodes).

Three sites start side by side. The one holding a key the coordinator never registered
is refused by the SuperLink (its log names the unknown key; the SuperNode gives up and
the site exits), and the run store never sees it. The two registered sites train the
run's one round through SecAgg+, and the round is committed. While it trains, an
outsider holding only the public `ca.crt` (no site key) points `flwr ls`, `flwr run` (an
app whose ServerApp would write a file) and `flwr stop` at the coordinator's public
address and is refused: only the Fleet API is served there; the SuperLink's own sockets
(Control, Runtime, Fleet) listen on 127.0.0.1 at another port. One federation serves all
tests (starting Flower's daemons is the slow part). (`--insecure` off loopback:
tests/test_site_daemon.py.)
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from deploy_helpers import Proc, coordinator_args, deployment_root, fedmoe, foreign_app, free_port, site_args

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 300.0
REGISTERED = {"site-00": "hospital-a", "site-01": "hospital-b"}  # data folder -> key name

EVIL_APP = """
from pathlib import Path
from flwr.serverapp import ServerApp
from flwr.clientapp import ClientApp

app = ServerApp()
client = ClientApp()

@app.main()
def main(grid, context):
    Path({marker!r}).write_text("ran on the coordinator")
"""


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets process `pid` listens on, from /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                addr, port = cols[1].split(":")
                raw = bytes.fromhex(addr)
                if len(raw) == 4:
                    addr = ".".join(str(b) for b in raw[::-1])
                found.add((addr, int(port, 16)))
    return found


def outsider(root: Path, ca: Path, port: int, run_id: str) -> dict:
    """`flwr ls/run/stop` from someone holding only ca.crt, at the coordinator's public address."""
    home, app, marker = root / "outsider-home", root / "outsider-app", root / "outsider-was-here"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "outsider"\n\n[superlink.outsider]\n'
                                      f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n')
    foreign_app(app, EVIL_APP.format(marker=str(marker)))
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    results = {}
    for name, args in (("ls", ["ls", "outsider"]), ("run", ["run", str(app), "outsider"]), ("stop", ["stop", run_id, "outsider"])):
        r = subprocess.run(["flwr", *args], capture_output=True, text=True, timeout=90, env=env)
        results[name] = (r.returncode, r.stdout + r.stderr)
    results["marker"] = marker
    return results


@pytest.fixture(scope="module")
def auth_deployment(tmp_path_factory):
    model, root, suite, env = deployment_root(tmp_path_factory, "auth", domains=1, sites=3)
    keys = root / "keys"
    for args in (["init", "--host", "127.0.0.1"], *(["site", k] for k in REGISTERED.values()), ["site", "stranger"]):
        r = fedmoe("keys", *args, "--out", str(keys))
        assert r.returncode == 0, r.stderr
    port, out = free_port(), root / "run"
    tls = ["--ssl-ca-certfile", str(keys / "ca.crt"), "--ssl-certfile", str(keys / "server.pem"), "--ssl-keyfile", str(keys / "server.key")]
    registered = [a for k in REGISTERED.values() for a in ("--site-public-key", str(keys / "sites" / f"{k}.pub"))]
    procs: list[Proc] = []

    def site(data: str, key: str) -> Proc:
        p = Proc(key, site_args(port, suite / data, model, root / f"work-{key}", "--root-certificates", str(keys / "ca.crt"),
                                "--auth-supernode-private-key", str(keys / "sites" / key), "--max-retries", "2"), root, env)
        procs.append(p)
        return p

    try:
        started = time.monotonic()
        coord = Proc("coordinator", coordinator_args(port, out, model, rounds=1, sites=2, round_timeout=120, timeout=RUN_TIMEOUT,
                                                     extra=(*tls, "--enable-supernode-auth", *registered, "--privacy", "secagg",
                                                            "--clip", "0.5")), root, env)
        procs.append(coord)
        run_id = coord.wait_for(r"Successfully started run (\d+)", 120).group(1)  # keys are registered before the run
        text = coord.text()
        superlink_pid = int(re.search(r"SuperLink \(pid (\d+)\)", text).group(1))
        control_port = int(re.search(r"APIs on 127\.0\.0\.1:(\d+) \(loopback only\)", text).group(1))
        superlink_sockets = listening_sockets(superlink_pid)
        tcp_table = Path("/proc/net/tcp").read_text()  # the whole machine's, at the same moment
        stranger = site("site-02", "stranger")
        sites = {key: site(data, key) for data, key in REGISTERED.items()}
        refused = outsider(root, keys / "ca.crt", port, run_id)  # while the registered sites train
        stranger_rc = stranger.popen.wait(120)
        coord_rc = coord.popen.wait(RUN_TIMEOUT + 60)
        print(f"authenticated secagg deployment: {time.monotonic() - started:.0f}s")
        yield {"out": out, "coord": coord, "coord_rc": coord_rc, "stranger": stranger, "stranger_rc": stranger_rc,
               "sites": sites, "still_up": {k: p.popen.poll() is None for k, p in sites.items()}, "refused": refused,
               "port": port, "control_port": control_port, "superlink_sockets": superlink_sockets,
               "tcp_table": tcp_table}
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
        # The stranger never reached the ServerApp.
        assert [s["site"] for s in store.sites()] == sorted(REGISTERED), "\n".join(p.tail() for p in d["sites"].values())
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


def test_outsider_with_the_ca_cert_cannot_list_submit_or_stop(auth_deployment):
    d = auth_deployment
    for name in ("ls", "run", "stop"):
        rc, out = d["refused"][name]
        # Refused by the gate (404 on /v1/control/...), not by anything on the outsider's side.
        assert rc != 0 and "404" in out and "/v1/control/" in out, f"flwr {name}: rc={rc}\n{out[-1500:]}"
    assert not d["refused"]["marker"].exists()  # the outsider's ServerApp never ran
    assert d["coord_rc"] == 0  # and its `flwr stop` did not stop the run


def test_control_api_listens_on_loopback_only(auth_deployment):
    d = auth_deployment
    sockets = d["superlink_sockets"]
    assert ("127.0.0.1", d["control_port"]) in sockets, sockets  # the SuperLink's one HTTP port: Control, Runtime, Fleet
    assert all(addr == "127.0.0.1" for addr, _ in sockets), sockets
    assert d["port"] not in {p for _, p in sockets}  # the public port is the fleet gate's, not the SuperLink's
    listeners = {cols[1] for cols in (l.split() for l in d["tcp_table"].splitlines()[1:]) if cols[3] == "0A"}
    assert {a for a in listeners if int(a.split(":")[1], 16) == d["control_port"]} == {f"0100007F:{d['control_port']:04X}"}
