"""Helpers for the tests that run real Flower daemons (`fedmoe coordinator start`,
`fedmoe site start`) on 127.0.0.1: free ports, and `fedmoe ...` subprocesses in their
own session with their output in a log file, stopped (whole tree) at teardown; and the commands that print a JSON banner once they listen (`fedmoe_daemon`: serve, dashboard)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedmoe(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def deployment_root(tmp_path_factory, name: str, domains: int, sites: int) -> tuple[Path, Path, Path, dict]:
    """What every deployment test starts from: the tiny model, a fresh folder `name` with a
    suite (`domains` x `sites` sites) in suite/, and the daemons' environment (their own
    FLWR_HOME, no runtime dependency installation). Returns (model, root, suite, env)."""
    from fedmoe.shared.pretrain import ensure_default_model
    from fedmoe.simulations.domain_suite import make_suite

    model = ensure_default_model()
    root = tmp_path_factory.mktemp(name)
    make_suite(root / "suite", domains=domains, sites=sites, seed=0)
    env = dict(os.environ, PYTHONUNBUFFERED="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_HOME=str(root / "flwr-home"))
    return model, root, root / "suite", env


def coordinator_args(port: int, out: Path, model: Path, *, rounds: int, sites: int, round_timeout: float,
                     timeout: float, extra: tuple[str, ...] = ("--insecure",)) -> list[str]:
    """`fedmoe coordinator start` on 127.0.0.1:`port` for a short tiny-model run (1 local
    step of batch 4 a round), `extra` its security flags."""
    return ["coordinator", "start", *extra, "--host", "127.0.0.1", "--port", str(port), "--out", str(out),
            "--rounds", str(rounds), "--expected-sites", str(sites), "--local-steps", "1", "--batch-size", "4",
            "--round-timeout", str(round_timeout), "--node-wait", "180", "--model", str(model), "--timeout", str(timeout)]


def site_args(port: int, data: Path, model: Path, work: Path, *extra: str) -> list[str]:
    """`fedmoe site start` against 127.0.0.1:`port` (rank 4, unquantized, 1 thread), `extra`
    its security flags."""
    return ["site", "start", *extra, "--superlink", f"127.0.0.1:{port}", "--data", str(data), "--quant", "none",
            "--rank", "4", "--model", str(model), "--work-dir", str(work), "--threads", "1"]


def foreign_app(folder: Path, source: str) -> Path:
    """A Flower app that is not fedmoe's, as an outsider would submit it: `source` as
    evil.py (a ServerApp `app` and a ClientApp `client`) and its pyproject.toml."""
    folder.mkdir()
    (folder / "evil.py").write_text(source)
    (folder / "pyproject.toml").write_text('[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
                                           '[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n\n'
                                           '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
                                           '[tool.flwr.app]\npublisher = "evil"\n\n[tool.flwr.app.components]\n'
                                           'serverapp = "evil:app"\nclientapp = "evil:client"\n\n[tool.flwr.app.config]\n')
    return folder


class Proc:
    """A `fedmoe ...` subprocess in its own session, output in a log file."""

    def __init__(self, name: str, args: list[str], logdir: Path, env: dict):
        self.name, self.log = name, logdir / f"{name}.log"
        with open(self.log, "wb") as f:
            self.popen = subprocess.Popen([sys.executable, "-m", "fedmoe.shared.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.text()):
                return m
            if self.popen.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {pattern!r} within {timeout:.0f}s; log tail:\n{self.text()[-3000:]}")

    def tail(self, chars: int = 1500) -> str:
        return f"--- {self.name} ---\n{self.text()[-chars:]}"

    def stop(self) -> None:
        from fedmoe.shared.processes import stop_group

        stop_group(self.popen, grace=10)


@contextlib.contextmanager
def fedmoe_daemon(*args: str, check_exit: bool = False):
    """`fedmoe ARGS` (a command that prints a JSON banner ending in a lone "}" once it
    listens: serve, dashboard) as a subprocess: yields the banner, then stops it with
    SIGTERM (bounded); with `check_exit`, a clean stop must exit 0."""
    import json

    proc = subprocess.Popen([sys.executable, "-m", "fedmoe.shared.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    stopped_cleanly = False
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.rstrip() == "}":
                break
        if not lines or lines[-1].rstrip() != "}":
            proc.kill()
            pytest.fail(f"fedmoe {args[0]} did not start: " + proc.stderr.read()[-2000:])
        yield json.loads("".join(lines))
        stopped_cleanly = True
    finally:
        proc.terminate()
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    if check_exit and stopped_cleanly:
        assert rc == 0, f"fedmoe {args[0]} exited {rc} on SIGTERM: " + proc.stderr.read()[-2000:]


def fedmoe_serve(run: Path, *extra: str):
    """`fedmoe serve --run RUN --host 127.0.0.1 --grpc-port 0 --json [extra]` as a
    subprocess: a context manager that yields its printed JSON info and stops it afterwards."""
    return fedmoe_daemon("serve", "--run", str(run), "--host", "127.0.0.1", "--grpc-port", "0", "--json", *extra)
