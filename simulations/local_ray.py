"""The Ray instance `fedmoe simulate` starts: on loopback only, with token auth.

Flower's Simulation Engine starts Ray with `ray.init(**init_args)`. Left alone, Ray
2.55 listens on every interface (GCS, raylet, workers: anyone on the network could
submit tasks, i.e. run code as us) and `ray.init(_node_ip_address="127.0.0.1")` does
not help: Ray replaces a loopback address with the machine's routable one. Ray binds
to loopback only when it takes loopback as the node address, which it does when its
"cluster" mode is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by ray_constants). On
top, RAY_AUTH_MODE=token makes every Ray RPC carry a fresh random token, which only
this process and the Ray processes it starts (they inherit the environment) know.

Not applied with `--ray-address`: that cluster is the operator's, set up their way (its
token, if it wants one, comes from the environment: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN).
Only when that cluster listens on loopback alone does the driver turn cluster mode off
(`cluster_mode_off`), or Ray would look for it at the machine's routable address.
"""

from __future__ import annotations

import os
import secrets
import sys
from contextlib import contextmanager

_TOKEN = secrets.token_hex(32)  # this process's Ray token: never written to disk, gone with the process
_token_armed = False


@contextmanager
def cluster_mode_off():
    """Inside: Ray takes 127.0.0.1 as this machine's node address (and its own processes bind there)."""
    saved_env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts
    import ray._private.ray_constants as ray_constants  # read at import: ray may be imported already

    saved, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved_env


def loopback_only(host: str, port: int) -> bool:
    """Whether the Ray head at loopback `host:port` listens on loopback alone. Ray would
    look for it at this machine's routable address (it resolves 127.0.0.1 to that)."""
    import socket

    from fedmoe.shared.network import is_loopback_host

    if not is_loopback_host(host):
        return False
    from ray._private.services import get_node_ip_address

    routable = get_node_ip_address()
    if is_loopback_host(routable):
        return False
    try:
        socket.create_connection((routable, port), timeout=5).close()
        return False
    except OSError:
        return True


@contextmanager
def loopback_ray():
    """Inside: a Ray started by this process binds to 127.0.0.1 and requires a token.
    Enter it before anything imports ray: Ray reads RAY_AUTH_MODE once, when its core
    library loads, so after that token auth cannot be turned on (loopback still is)."""
    global _token_armed
    env = {}
    if "ray._raylet" not in sys.modules or _token_armed:
        _token_armed = True  # Ray keeps token mode for the process: a later run needs the same token
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _TOKEN}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before cluster_mode_off imports ray
    try:
        with cluster_mode_off():
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
