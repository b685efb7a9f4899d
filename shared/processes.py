"""Child processes that never outlive us: stop a whole tree, die with the parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop `proc` and everything it started: SIGTERM, then SIGKILL after `grace`.

    Flower's daemons start helpers in new sessions (the SuperLink's SuperExec and its
    ServerApp), so killing the process group is not enough: the whole tree is collected
    first, while parent links still exist.
    """
    import psutil

    try:
        root = psutil.Process(proc.pid)
        tree = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive + [q for q in _group(proc.pid)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def die_with_parent() -> None:
    """For Popen(preexec_fn=...): the child gets SIGTERM if this process dies, even by SIGKILL
    (Linux), so a killed `fedmoe site start` / coordinator leaves no Flower daemon behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _group(pgid: int) -> list:
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return out
