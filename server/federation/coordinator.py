"""Run a federation on real daemons: a Flower SuperLink plus our ServerApp, submitted
with `flwr run`, waited on, and shut down.

Flower's CLI needs an app folder (a pyproject.toml with `[tool.flwr.app]`) and a
connection in `$FLWR_HOME/config.toml`. Both are written into `<out>/flwr/`, so the
coordinator works from any installation of fedmoe (the app's code is the installed
`fedmoe` package; the bundle Flower ships to the nodes carries only the manifest) and
never touches the operator's `~/.flwr`. The same `[tool.flwr.app]` section is in the
repository's pyproject.toml, so `flwr run . <connection>` also works from a checkout.

Only the Fleet API faces the network. Flower 1.42's SuperLink serves Fleet, Control and
Runtime on one host:port with no Control API authentication (outside Flower's enterprise
OIDC plugin), so the SuperLink listens on 127.0.0.1 at a port of its own and
fedmoe.server.federation.fleet_gate listens on the public `--host:--port`, forwarding
only `/v1/fleet/*`. fedmoe's own `flwr run/ls/stop/supernode register` go to the loopback
address. With TLS, the loopback SuperLink gets a certificate made for 127.0.0.1 at each
start (in `<out>/flwr/loopback-tls/`), so the operator's certificate need not name it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedmoe.shared.network import is_loopback_host
from fedmoe.shared.processes import popen_bound_to_parent
from fedmoe.shared.processes import stop_group as stop_tree
from fedmoe.server.federation.run_config import deployed_run_config
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.flower_app import COMPONENTS

CONNECTION = "fedmoe"

# The run config the ServerApp reads (server_app.plan_from_run_config), with defaults:
# the flat view of FederationPlan. pyproject.toml's [tool.flwr.app.config] is the same
# (regenerate it with `python -m fedmoe.server.federation.run_config`; a test checks).
APP_CONFIG: dict = deployed_run_config()


def log(text: str) -> None:
    print(f"fedmoe coordinator: {text}", file=sys.stderr, flush=True)


@dataclass
class Security:
    insecure: bool = False
    ca_certfile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    supernode_auth: bool = False
    site_keys: list[str] = field(default_factory=list)  # OpenSSH public keys to register


def check_security(host: str, sec: Security) -> None:
    tls = [sec.ca_certfile, sec.certfile, sec.keyfile]
    if sec.insecure:
        if any(tls):
            raise FedmoeError("--insecure and --ssl-* options exclude each other")
        if sec.supernode_auth or sec.site_keys:
            raise FedmoeError("site authentication needs TLS: give --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile, not --insecure")
        if not is_loopback_host(host):
            raise FedmoeError(f"--insecure is allowed only on a loopback host (127.0.0.1, ::1, localhost), not {host!r}")
        log("warning: --insecure: no TLS and an unauthenticated control API (loopback only, for testing)")
        return
    if not all(tls):
        raise FedmoeError("give all of --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile for TLS (or --insecure on loopback)")
    for flag, path in zip(("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"), tls):
        if not Path(path).is_file():
            raise FedmoeError(f"{flag}: file not found: {path}")
    if sec.site_keys and not sec.supernode_auth:
        raise FedmoeError("--site-public-key needs --enable-supernode-auth")
    for key in sec.site_keys:
        if not Path(key).is_file():
            raise FedmoeError(f"--site-public-key: file not found: {key}")


def app_pyproject(config: dict) -> dict:
    """The Flower app manifest: components and run-config defaults (no code: it is installed)."""
    return {
        "build-system": {"requires": ["setuptools>=69"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "fedmoe", "version": _version(), "description": "fedmoe federation (ServerApp + ClientApp)", "license": "Apache-2.0",
                    "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "fedmoe", "components": dict(COMPONENTS),
                                  "config": dict(config)}}},
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fedmoe")
    except Exception:
        return "0.1.0"


def write_flwr_home(home: Path, address: str, root_certificates: str | None) -> Path:
    """`$FLWR_HOME/config.toml` with one connection (insecure when `root_certificates` is
    None), and the app folder; returns the app folder."""
    import tomli_w

    home.mkdir(parents=True, exist_ok=True)
    conn: dict = {"address": address}
    if root_certificates is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))
    app = home / "app"
    app.mkdir(exist_ok=True)
    (app / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject(APP_CONFIG)))
    return app


def wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float, logfile: Path,
                   name: str = "flower-superlink") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedmoeError(f"{name} exited with status {proc.returncode}: {tail(logfile)}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise FedmoeError(f"{name} did not listen on {host}:{port} within {timeout:.0f}s (log: {logfile})")


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_tls(home: Path) -> dict[str, str]:
    """A throw-away CA and a certificate for 127.0.0.1, for the loopback SuperLink: made
    at each start so no key outlives its coordinator, private keys 0600."""
    from fedmoe.server.ops.keys import make_ca_and_server_cert

    folder = home / "loopback-tls"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    return make_ca_and_server_cert(folder, ["127.0.0.1"], days=30)


def tail(path: Path, lines: int = 3) -> str:
    try:
        text = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])[-600:]


def stop_group(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """Stop `proc` and its whole tree (the SuperLink, its SuperExec and ServerApp)."""
    if proc is not None:
        stop_tree(proc, grace)


@dataclass
class CoordinatorResult:
    run_id: str | None
    status: str
    rounds_committed: int
    experts: list[str]
    seconds: float
    out: str


def run_coordinator(out: str | Path, host: str, port: int, sec: Security, run_config: dict, timeout: float | None = None,
                    echo=None) -> CoordinatorResult:
    """Start a SuperLink, submit the app, stream its log until the run ends, stop the SuperLink."""
    for tool in ("flower-superlink", "flwr"):
        if shutil.which(tool) is None:
            raise FedmoeError(f"{tool} not found on PATH (install flwr)")
    check_security(host, sec)
    unknown = sorted(set(run_config) - set(APP_CONFIG))
    if unknown:
        raise FedmoeError(f"unknown run config key {unknown[0]!r}: choose from {', '.join(APP_CONFIG)}")
    out = Path(out).resolve()
    if (out / "run.db").exists() and not run_config.get("resume"):
        raise FedmoeError(f"{out} already holds a run (run.db); choose another --out, or --resume it")
    out.mkdir(parents=True, exist_ok=True)
    home = out / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    inner_port = free_loopback_port()
    inner = None if sec.insecure else loopback_tls(home)
    # fedmoe's own flwr commands talk to the loopback SuperLink: the public port has no Control API.
    control = f"127.0.0.1:{inner_port}"
    app = write_flwr_home(home, control, None if inner is None else inner["ca_certfile"])
    config = dict(run_config, out=str(out))
    import tomli_w

    (home / "run-config.toml").write_text(tomli_w.dumps(config))
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.setdefault("PYTHONUNBUFFERED", "1")

    cmd = ["flower-superlink", "--host", "127.0.0.1", "--port", str(inner_port), "--disable-runtime-dependency-installation"]
    gate_cmd = [sys.executable, "-m", "fedmoe.server.federation.fleet_gate", "--host", host, "--port", str(port)]
    if sec.insecure:
        cmd.append("--insecure")
        gate_cmd += ["--upstream", f"http://{control}"]
    else:
        cmd += ["--ssl-ca-certfile", inner["ca_certfile"], "--ssl-certfile", inner["certfile"], "--ssl-keyfile", inner["keyfile"]]
        if sec.supernode_auth:
            cmd.append("--enable-supernode-auth")
        gate_cmd += ["--upstream", f"https://{control}", "--upstream-ca", inner["ca_certfile"],
                     "--certfile", str(Path(sec.certfile).resolve()), "--keyfile", str(Path(sec.keyfile).resolve())]
    started = time.perf_counter()
    superlink_log = out / "superlink.log"
    gate_log = out / "fleet-gate.log"
    superlink = runner = gate = None
    run_id = None
    status = "unknown"
    try:
        with open(superlink_log, "ab") as f:
            superlink = popen_bound_to_parent(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        log(f"SuperLink (pid {superlink.pid}) starting; Control, Runtime and Fleet APIs on {control} (loopback only); "
            f"log: {superlink_log}")
        wait_listening("127.0.0.1", inner_port, superlink, 120, superlink_log)
        with open(gate_log, "ab") as f:
            gate = popen_bound_to_parent(gate_cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        wait_listening(connect_host, port, gate, 60, gate_log, name="the fleet gate")
        log(f"Fleet API for the sites on {host}:{port} (pid {gate.pid}; nothing else is served there)")
        for key in sec.site_keys:
            flwr(["supernode", "register", str(Path(key).resolve()), CONNECTION], env, what=f"registering {key}")
        log(f"app bundle sha256 {bundle_sha256(app)} (sites may pin it: fedmoe site start --trust-fab-hash)")
        runner = popen_bound_to_parent(["flwr", "run", str(app), CONNECTION, "--run-config", str(home / "run-config.toml"), "--stream"],
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                       start_new_session=True)
        run_log = out / "coordinator.log"
        found: dict = {}
        reader = threading.Thread(target=_pump, args=(runner, run_log, echo, found), daemon=True)
        reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while runner.poll() is None:
            if superlink.poll() is not None:
                raise FedmoeError(f"flower-superlink exited with status {superlink.returncode}: {tail(superlink_log)}")
            if gate.poll() is not None:
                raise FedmoeError(f"the fleet gate exited with status {gate.returncode}: {tail(gate_log)}")
            if deadline is not None and time.monotonic() > deadline:
                raise FedmoeError(f"the run did not finish within --timeout {timeout:.0f}s; see {run_log}")
            time.sleep(0.5)
        reader.join(5)
        run_id = found.get("run_id")
        if runner.returncode != 0 or not run_id:
            raise FedmoeError(f"`flwr run` failed (status {runner.returncode}): {tail(run_log)}")
        status = run_status(run_id, env)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if run_id and status in ("unknown", "interrupted", "running"):
            # Stop the run on the SuperLink before stopping the SuperLink itself.
            subprocess.run(["flwr", "stop", str(run_id), CONNECTION], env=env, capture_output=True, timeout=60)
        stop_group(runner, 5)
        stop_group(gate, 5)
        stop_group(superlink)
    rounds, experts, state = summarize(out)
    if state:
        status = f"{status} (run store: {state})" if status != "unknown" else state
    return CoordinatorResult(run_id, status, rounds, experts, time.perf_counter() - started, str(out))


def bundle_sha256(app: Path) -> str:
    """The sha256 of the bundle `flwr run` builds from `app` (Flower builds it byte for byte
    the same way: fixed zip dates, sorted files), the digest a site can pin."""
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(app)).hexdigest()


def stored_run_config(out: str | Path) -> dict:
    """The run config a run in `out` was started with, marked to resume (`--resume OUT`)."""
    import tomllib

    out = Path(out)
    path = out / "flwr" / "run-config.toml"
    if not (out / "run.db").exists() or not path.exists():
        raise FedmoeError(f"nothing to resume in {out}: no run.db / flwr/run-config.toml from `fedmoe coordinator start`")
    config = tomllib.loads(path.read_text())
    config.pop("out", None)
    return config | {"resume": True}


def _pump(proc: subprocess.Popen, logfile: Path, echo, found: dict) -> None:
    pattern = re.compile(r"Successfully started run (\d+)")
    with open(logfile, "a") as f:
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if echo:
                echo(line.rstrip("\n"))
            if "run_id" not in found and (m := pattern.search(line)):
                found["run_id"] = m.group(1)


def flwr(args: list[str], env: dict, what: str, timeout: float = 120) -> str:
    r = subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise FedmoeError(f"{what} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r.stdout


def run_status(run_id: str, env: dict) -> str:
    """Flower's status of the run, e.g. 'finished:completed' or 'finished:failed'."""
    try:
        text = flwr(["ls", "--run-id", str(run_id), CONNECTION, "--format", "json"], env, "flwr ls", timeout=60)
        runs = json.loads(text[text.index("{"):]).get("runs", [])
        return str(runs[0]["status"]) if runs else "unknown"
    except (FedmoeError, ValueError, KeyError, subprocess.TimeoutExpired):
        return "unknown"


def summarize(out: Path) -> tuple[int, list[str], str | None]:
    if not (out / "run.db").exists():
        return 0, [], None
    from fedmoe.server.federation.run_store import RunStore

    store = RunStore(out, readonly=True)
    try:
        rounds = store.last_committed_round()
        state = store.run().get("state")
    finally:
        store.close()
    experts = sorted(p.name for p in (out / "experts").iterdir()) if (out / "experts").is_dir() else []
    return rounds, experts, state
