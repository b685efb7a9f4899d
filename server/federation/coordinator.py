"""Run a federation on real daemons: a Flower SuperLink plus our ServerApp, submitted
with `flwr run`, waited on, and shut down.

Flower's CLI needs an app folder (a pyproject.toml with `[tool.flwr.app]`) and a
connection in `$FLWR_HOME/config.toml`. Both are written into `<out>/flwr/`, so the
coordinator works from any installation of fedmoe (the app's code is the installed
`fedmoe` package; the bundle Flower ships to the nodes carries only the manifest) and
never touches the operator's `~/.flwr`. The same `[tool.flwr.app]` section is in the
repository's pyproject.toml, so `flwr run . <connection>` also works from a checkout.
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
from fedmoe.shared.processes import die_with_parent
from fedmoe.shared.processes import stop_group as stop_tree
from fedmoe.shared.errors import FedmoeError

CONNECTION = "fedmoe"
SERVER_APP = "fedmoe.server.federation.server_app:app"
CLIENT_APP = "fedmoe.client.client_app:app"

# The run config the ServerApp reads (server_app.plan_from_run_config), with defaults.
# Mirrored in pyproject.toml's [tool.flwr.app.config]; tests check the two agree.
APP_CONFIG: dict = {
    "rounds": 3,
    "local-steps": 30,
    "batch-size": 16,
    "lr": 0.003,
    "seed": 0,
    "aggregation": "exact",
    "fraction": 1.0,
    "min-nodes": 1,
    "round-timeout": 900.0,
    "prox-mu": 0.0,
    "server-opt": "none",
    "server-lr": 0.003,
    "server-tau": 0.001,
    "expected-sites": 1,
    "node-wait": 120.0,
    "out": "runs/deployed",
    "model-path": "",
    "min-replies": 1,
    "short-round": "proceed",
    "max-retries": 1,
    "resume": False,
    "privacy": "none",
    "clip": 0.0,  # 0: the privacy mode's default (fedmoe.server.federation.privacy.DEFAULT_CLIP)
    "lr-schedule": "cosine",  # constant | cosine over all rounds (StrategyConfig.lr_schedule)
    "eval-every": 1,  # sites evaluate the experts every k-th round (0: never)
}


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
        "tool": {"flwr": {"app": {"publisher": "fedmoe", "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                                  "config": dict(config)}}},
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fedmoe")
    except Exception:
        return "0.1.0"


def write_flwr_home(home: Path, address: str, sec: Security) -> Path:
    """`$FLWR_HOME/config.toml` with one connection, and the app folder; returns the app folder."""
    import tomli_w

    home.mkdir(parents=True, exist_ok=True)
    conn: dict = {"address": address}
    if sec.insecure:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(sec.ca_certfile).resolve())
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))
    app = home / "app"
    app.mkdir(exist_ok=True)
    (app / "pyproject.toml").write_text(tomli_w.dumps(app_pyproject(APP_CONFIG)))
    return app


def wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float, logfile: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedmoeError(f"flower-superlink exited with status {proc.returncode}: {tail(logfile)}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise FedmoeError(f"flower-superlink did not listen on {host}:{port} within {timeout:.0f}s (log: {logfile})")


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
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    address = f"[{connect_host}]:{port}" if ":" in connect_host else f"{connect_host}:{port}"
    app = write_flwr_home(home, address, sec)
    config = dict(run_config, out=str(out))
    import tomli_w

    (home / "run-config.toml").write_text(tomli_w.dumps(config))
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    env.setdefault("PYTHONUNBUFFERED", "1")

    cmd = ["flower-superlink", "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if sec.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", sec.ca_certfile, "--ssl-certfile", sec.certfile, "--ssl-keyfile", sec.keyfile]
        if sec.supernode_auth:
            cmd.append("--enable-supernode-auth")
    started = time.perf_counter()
    superlink_log = out / "superlink.log"
    superlink = runner = None
    run_id = None
    status = "unknown"
    try:
        with open(superlink_log, "ab") as f:
            superlink = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with_parent)
        log(f"SuperLink (pid {superlink.pid}) starting on {host}:{port}; log: {superlink_log}")
        wait_listening(connect_host, port, superlink, 120, superlink_log)
        for key in sec.site_keys:
            flwr(["supernode", "register", str(Path(key).resolve()), CONNECTION], env, what=f"registering {key}")
        runner = subprocess.Popen(["flwr", "run", str(app), CONNECTION, "--run-config", str(home / "run-config.toml"), "--stream"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                  start_new_session=True, preexec_fn=die_with_parent)
        run_log = out / "coordinator.log"
        found: dict = {}
        reader = threading.Thread(target=_pump, args=(runner, run_log, echo, found), daemon=True)
        reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while runner.poll() is None:
            if superlink.poll() is not None:
                raise FedmoeError(f"flower-superlink exited with status {superlink.returncode}: {tail(superlink_log)}")
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
        stop_group(superlink)
    rounds, experts, state = summarize(out)
    if state:
        status = f"{status} (run store: {state})" if status != "unknown" else state
    return CoordinatorResult(run_id, status, rounds, experts, time.perf_counter() - started, str(out))


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
