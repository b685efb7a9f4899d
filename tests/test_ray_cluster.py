"""`fedmoe simulate --ray-address` against a real two-node Ray cluster (issue 18).

A head and a worker node are started with `ray start --block` on this machine, each with
one CPU, a private --temp-dir, free ports and token authentication; `fedmoe simulate
--ray-address` then runs the smoke federation on them. Flower sizes its actor pool node
by node (one CPU per site: one actor per node), so the sites' ClientAppActor.run tasks
must run on both nodes; the GCS's task and actor tables (the state API's source) say
where they ran. The nodes are stopped by their own PIDs (never `ray stop`, which stops
every Ray on the machine), and every process left with the private temp dir in its
command line is killed.

Loopback only: `ray start --node-ip-address 127.0.0.1` alone would not do it. Ray
replaces a loopback node address by the machine's routable one (and then binds GCS and
raylet to every interface), and refuses to start a worker node at all with cluster mode
off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, how fedmoe's own Ray stays on loopback). So the
nodes are started by `ray start`'s own entry point with Ray's "this host's address" answer
pinned to 127.0.0.1 (LAUNCH). `fedmoe simulate` sees that the head answers on loopback
only and turns cluster mode off for itself (`local_ray.loopback_only`); the plain Ray
drivers here (state, stranger) are given RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 for that.
A real multi-machine cluster needs none of this (README).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from fedmoe.shared.network import free_port
from fedmoe.simulations.simulate import gpus_per_site

# `ray start`, with Ray's own-address lookup pinned to loopback (see the module docstring)
LAUNCH = ("import sys, ray._private.services as s; s.get_node_ip_address = lambda address=None: '127.0.0.1'; "
          "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


def pids_with(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (our private temp dir)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if marker in Path(f"/proc/{d}/cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(d))
            except OSError:
                pass
    return found


def tcp_listeners(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket the given processes hold."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ip, port = f[1].rsplit(":", 1)
                raw = bytes.fromhex(ip)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":
                    raw = raw[12:]  # IPv4-mapped
                fam = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                out.append((socket.inet_ntop(fam, raw), int(port, 16)))
    return out


class RayNode:
    """One `ray start --block` node: its process is the parent of the node's Ray
    processes, which Ray ties to it (they die with it)."""

    def __init__(self, name: str, root: Path, env: dict, args: list[str]):
        self.log = root / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
             "--disable-usage-stats", "--temp-dir", str(root / name), "--dashboard-agent-listen-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port()), *args],
            env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=root)

    def wait_started(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"{self.log.name}: Ray did not start\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # ray start --block: kills its node's processes, then exits
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


STATE = textwrap.dedent('''
    import json, sys
    import ray
    from ray.core.generated import gcs_pb2
    from ray._private.state import state

    ray.init(address=sys.argv[1], log_to_driver=False)
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    actors = {a: info["Address"]["NodeID"] for a, info in ray._private.state.actors().items()
              if info["ActorClassName"].endswith("ClientAppActor")}
    # the task table behind `ray list tasks` (read from the GCS: no dashboard needed)
    runs = {}
    for raw in state._connect_and_get_accessor().get_task_events():
        event = gcs_pb2.TaskEvents.FromString(raw)
        if event.task_info.name.endswith("ClientAppActor.run") and event.state_updates.node_id:
            runs[event.task_id.hex()] = event.state_updates.node_id.hex()
    print(json.dumps({"nodes": nodes, "actors": actors, "runs": runs}))
''')


@pytest.mark.slow
def test_simulate_on_a_two_node_ray_cluster_runs_sites_on_both_nodes(tmp_path, tiny_model_dir):
    root = Path(tempfile.mkdtemp(prefix="fmrc", dir="/tmp"))  # short: Ray's socket paths live below it
    token = secrets.token_hex(32)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    driver_env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # a plain driver takes 127.0.0.1 as its address
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[RayNode] = []
    t0 = time.monotonic()
    try:
        nodes.append(RayNode("head", root, env, ["--head", "--port", str(port), "--include-dashboard", "false",
                                                 "--dashboard-port", str(free_port()),
                                                 "--ray-client-server-port", str(free_port())]))
        nodes[0].wait_started()
        nodes.append(RayNode("worker", root, env, ["--address", address]))
        nodes[1].wait_started()
        listeners = tcp_listeners(pids_with(str(root)))
        assert len(listeners) >= 3 and {ip for ip, _ in listeners} == {"127.0.0.1"}, listeners

        out = tmp_path / "run"
        proc = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--preset", "smoke",
                               "--rounds", "1", "--local-steps", "2", "--no-baselines", "--no-moe", "--no-mia",
                               "--eval-every", "0", "--ray-address", address, "--out", str(out), "--json"],
                              capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        report = json.loads(proc.stdout)
        trained = report["methods"]["experts_oracle"]["per_domain"]
        assert len(trained) == 2 and {p.name for p in (out / "experts").iterdir()} == set(trained), report

        state = subprocess.run([sys.executable, "-c", STATE, address], capture_output=True, text=True,
                               timeout=120, env=driver_env)
        assert state.returncode == 0, state.stderr[-3000:]
        got = json.loads(state.stdout.strip().splitlines()[-1])
        assert len(got["nodes"]) == 2 and set(got["nodes"].values()) == {"127.0.0.1"}, got["nodes"]
        assert set(got["actors"].values()) == set(got["nodes"]), got  # one site actor per node
        assert set(got["runs"].values()) == set(got["nodes"]), got  # and both ran site messages
        assert len(got["runs"]) >= 4, got  # QUERY + TRAIN of 4 sites at least
        print("site messages per node:", {n: list(got["runs"].values()).count(n) for n in got["nodes"]})

        # a driver without the cluster's token is turned away
        stranger = {k: v for k, v in driver_env.items() if k != "RAY_AUTH_TOKEN"}
        denied = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={address!r})"],
                                capture_output=True, text=True, timeout=120, env=stranger)
        assert denied.returncode != 0 and "token" in denied.stderr.lower(), denied.stderr[-2000:]
    finally:
        for node in reversed(nodes):
            node.stop()
        deadline = time.monotonic() + 20
        while (left := pids_with(str(root))) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # only processes started under our private temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
        print(f"two-node cluster test: {time.monotonic() - t0:.1f} s")
    assert not left, f"Ray processes outlived their node: {left}"


def test_ray_address_that_nobody_answers_is_a_one_line_error(tmp_path):
    for address, says in ((f"127.0.0.1:{free_port()}", "no Ray head answers there"), ("head-only", "not HOST:PORT")):
        proc = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--no-baselines",
                               "--ray-address", address, "--out", str(tmp_path / "x")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("fedmoe: error: --ray-address")
        assert says in proc.stderr, proc.stderr[-1000:]
        assert not (tmp_path / "x").exists()  # checked before --out is written


def test_sites_share_the_clusters_gpus_evenly():
    assert gpus_per_site(4, 0) == 0.0  # no GPU: the sites ask for none
    assert gpus_per_site(4, 1) == 0.25  # one GPU: four sites on it
    assert gpus_per_site(4, 2) == 0.5  # two (one a node): two sites a GPU, all four at once
    assert gpus_per_site(3, 2) == 0.5
    assert gpus_per_site(2, 8) == 1.0  # more GPUs than sites: a whole one each
