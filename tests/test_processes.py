"""Child processes that never outlive their parent (shared.processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from fedmoe.shared.processes import popen_bound_to_parent


PARENT = textwrap.dedent("""
    import sys, threading, time
    from fedmoe.shared.processes import popen_bound_to_parent
    # Busy threads, as in a site (gRPC server, torch): the child must still start.
    for _ in range(4):
        threading.Thread(target=lambda: [sum(range(1000)) for _ in iter(int, 1)], daemon=True).start()
    child = popen_bound_to_parent(["sleep", "120"], start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_child_dies_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        child = psutil.Process(child_pid)
        deadline = time.monotonic() + 10
        while child.name() != "sleep" and time.monotonic() < deadline:  # the wrapper has exec'd
            time.sleep(0.05)
        assert child.name() == "sleep"
        assert child.ppid() == parent.pid
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        gone, alive = psutil.wait_procs([child], timeout=10)
        assert not alive, "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait(10)
        try:
            os.kill(child_pid, signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError, NameError):
            pass


def test_the_command_runs_with_its_arguments_and_exit_status(tmp_path):
    out = tmp_path / "out.txt"
    p = popen_bound_to_parent([sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2]); sys.exit(3)",
                               str(out), "two words"])
    assert p.wait(30) == 3
    assert out.read_text() == "two words"


def test_preexec_fn_is_refused():
    with pytest.raises(TypeError, match="preexec_fn"):
        popen_bound_to_parent(["true"], preexec_fn=lambda: None)
