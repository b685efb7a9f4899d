"""fedmoe.client.supernode: Flower's SuperNode with its fixed waits capped."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time

import pytest

from fedmoe.client import supernode


def test_capped_sleep_caps_long_waits_and_keeps_short_ones():
    clock = supernode.CappedSleep(0.05)
    t = time.perf_counter()
    clock.sleep(3)
    assert time.perf_counter() - t < 1.0
    t = time.perf_counter()
    clock.sleep(0.02)
    assert time.perf_counter() - t >= 0.015
    assert clock.time is time.time and clock.monotonic is time.monotonic  # the rest is the time module's


def test_the_waits_it_caps_are_still_flowers_module_level_sleeps():
    """If Flower renames these, the cap would silently do nothing: fail here instead."""
    from flwr.supernode import start_client_internal

    assert start_client_internal.time is time
    src = inspect.getsource(start_client_internal)
    assert "time.sleep(3)" in src and "time.sleep(0.5)" in src


@pytest.mark.parametrize("value", ["fast", "0", "10"])
def test_a_bad_poll_value_is_one_clear_line(value):
    proc = subprocess.run([sys.executable, "-m", "fedmoe.client.supernode", "--help"], capture_output=True, text=True,
                          timeout=60, env={"FEDMOE_SUPERNODE_POLL_S": value, "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("fedmoe supernode: FEDMOE_SUPERNODE_POLL_S must be")


def test_site_start_refuses_a_poll_interval_out_of_range(tmp_path, capsys):
    from fedmoe.shared.cli import main

    assert main(["site", "start", "--superlink", "127.0.0.1:1", "--insecure", "--data", str(tmp_path), "--poll-interval", "0"]) != 0
    assert "--poll-interval must be between 0.05 and 3 seconds, got 0.0" in capsys.readouterr().err
