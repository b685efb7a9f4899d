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
