"""The Ray that `fedmoe simulate` starts listens on loopback only and wants a token
(issue 16). Ray is started exactly as the simulation starts it (Flower's RayBackend
with fedmoe's backend config, inside `loopback_ray`), in a child process, and every
TCP socket its process tree listens on is read from /proc/net/tcp{,6}."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, os, socket, struct, subprocess, sys

    def descendants(root):
        children = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                children.setdefault(ppid, []).append(int(d))
        out, todo = set(), [root]
        while todo:
            p = todo.pop()
            out.add(p)
            todo += children.get(p, [])
        return out

    def inodes(pids):
        found = {}
        for pid in pids:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        found[link[8:-1]] = pid
            except OSError:
                pass
        return found

    def address(hexaddr):
        raw = bytes.fromhex(hexaddr)
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # /proc: host-order 32-bit words
        if len(raw) == 16 and raw[:12] == b"\\0" * 10 + b"\\xff\\xff":
            raw = raw[12:]  # IPv4-mapped
        return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)

    def listeners():
        mine = inodes(descendants(os.getpid()))
        out = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in open(table).read().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in mine:
                    ip, port = f[1].rsplit(":", 1)
                    out.append([address(ip), int(port, 16), open(f"/proc/{mine[f[9]]}/comm").read().strip()])
        return out

    from fedmoe.simulations.local_ray import loopback_ray
    from fedmoe.simulations.simulate import backend_config_for

    assert "ray" not in sys.modules
    with loopback_ray():  # as run_flower does: ray is first imported inside
        from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
        import ray

        RayBackend(backend_config_for(None))
        ray.get(ray.remote(lambda: 1).remote())
        gcs = ray.get_runtime_context().gcs_address
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
        stranger = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={gcs!r})"], env=env,
                                  capture_output=True, text=True, timeout=120)
        print(json.dumps({"listeners": listeners(), "gcs": gcs, "stranger_rc": stranger.returncode,
                          "stranger_err": stranger.stderr[-600:]}))
    ray.shutdown()
''')


@pytest.mark.slow
def test_simulation_ray_listens_on_loopback_only_and_wants_a_token():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got["listeners"]) >= 3, got  # GCS, raylet, a worker at least
    assert {ip for ip, _, _ in got["listeners"]} == {"127.0.0.1"}, got["listeners"]
    assert got["gcs"].startswith("127.0.0.1:")
    assert got["stranger_rc"] != 0, "a client without the token joined the cluster"
    assert "auth" in got["stranger_err"].lower() or "token" in got["stranger_err"].lower(), got["stranger_err"]
