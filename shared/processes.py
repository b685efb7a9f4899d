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


# The child sets PR_SET_PDEATHSIG on itself and then execs the real command. This is not
# done in Popen(preexec_fn=...): preexec_fn runs Python in the forked child, and in a parent
# with gRPC, torch or uvicorn threads running, that child can deadlock before exec (CPython
# documents preexec_fn as unsafe with threads). A site's SuperNode was seen never to start
# that way on a loaded 2-core CI machine. The wrapper checks the parent it was given is still
# its parent, because the parent could die between fork and prctl.
_BOUND_TO_PARENT = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, 15)\n"  # PR_SET_PDEATHSIG, SIGTERM
    "if os.getppid() != int(sys.argv[1]): sys.exit(143)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def popen_bound_to_parent(cmd: list[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen(cmd, **kwargs), except that on Linux the child gets SIGTERM if this
    process dies, even by SIGKILL, so a killed `fedmoe site start` / coordinator leaves no
    Flower daemon behind. Elsewhere it is plain Popen."""
    if "preexec_fn" in kwargs:
        raise TypeError("popen_bound_to_parent does not take preexec_fn (unsafe with threads)")
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-S", "-c", _BOUND_TO_PARENT, str(os.getpid()), *map(str, cmd)]
    return subprocess.Popen(cmd, **kwargs)


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
