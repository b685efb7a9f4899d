"""Helpers for the tests that run real Flower daemons (`fedmoe coordinator start`,
`fedmoe site start`) on 127.0.0.1: free ports, and `fedmoe ...` subprocesses in their
own session with their output in a log file, stopped (whole tree) at teardown; and `fedmoe serve` as a subprocess (`fedmoe_serve`)."""

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
def fedmoe_serve(run: Path, *extra: str):
    """`fedmoe serve --run RUN --host 127.0.0.1 --grpc-port 0 --json [extra]` as a
    subprocess: yields its printed JSON info, stops it afterwards (bounded)."""
    import json

    proc = subprocess.Popen([sys.executable, "-m", "fedmoe.shared.cli", "serve", "--run", str(run),
                             "--host", "127.0.0.1", "--grpc-port", "0", "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    try:
        lines = []
        for line in proc.stdout:  # the JSON object ends with a lone "}"
            lines.append(line)
            if line.rstrip() == "}":
                break
        if not lines or lines[-1].rstrip() != "}":
            proc.kill()
            pytest.fail("fedmoe serve did not start: " + proc.stderr.read()[-2000:])
        yield json.loads("".join(lines))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
