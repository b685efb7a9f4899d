"""The site daemon: a long-lived local gRPC server that holds the site's model and data.

Flower's deployment engine starts a fresh ClientApp process for every message, so a
model loaded there would be loaded again every round. `fedmoe site start` runs this
daemon instead: it loads the (quantized) base model once, is the only process that
reads the site's data, runs `fedmoe.client.site` for each request, and appends one
JSON line per reply to an audit log saying exactly what left the site (tensor names,
shapes, dtypes, bytes, the delta's sha256 checksum, the metrics; never data).
The ClientApp forwards to it with the helpers at the bottom of this module, which
import neither torch nor the site code, so a forwarding ClientApp process starts fast.

The service listens on a Unix socket or a loopback address only.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from pathlib import Path

import grpc

from fedmoe.protos import lora_delta_pb2, site_daemon_pb2, site_daemon_pb2_grpc
from fedmoe.shared.errors import FedmoeError

MAX_MESSAGE_BYTES = 2**31 - 1  # adapters of large models are far over gRPC's 4 MB default
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
INT_KEYS = {"rank", "num-examples"}


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(address: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FedmoeError(f"{what} {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def check_local_address(address: str) -> str:
    """The daemon serves only on `unix:PATH` or a loopback HOST:PORT."""
    if address.startswith("unix:"):
        return address
    host, _ = split_host_port(address, "daemon address")
    if not is_loopback_host(host):
        raise FedmoeError(f"daemon address {address!r} is not local: use unix:PATH or a loopback address (127.0.0.1:PORT)")
    return address


# -- the daemon (server side; imports the site code and torch lazily) ----------------------

class AuditLog:
    """Append-only JSON lines: one per reply that left the site."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, entry: dict) -> None:
        line = json.dumps({"time": time.time()} | entry, sort_keys=True, default=str)
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()


def delta_summary(msg) -> dict:
    """What an audit entry records about an adapter proto: shapes and sizes, never values."""
    return {"rank": msg.rank, "alpha": msg.alpha, "base_fingerprint": msg.base_fingerprint, "sha256": msg.checksum,
            "bytes": sum(len(t.data) for t in msg.tensors),
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": len(t.data)} for t in msg.tensors]}


class SiteDaemonServicer(site_daemon_pb2_grpc.SiteDaemonServicer):
    def __init__(self, settings, audit: AuditLog, log=None):
        self.settings = settings
        self.audit = audit
        self.log = log or (lambda text: None)
        # One model per site: requests (e.g. two experts' TRAIN in one round) run one at a time.
        self._lock = threading.Lock()

    def _run(self, context, fn):
        from fedmoe.shared.errors import FedmoeError

        try:
            with self._lock:
                return fn()
        except FedmoeError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:  # report, keep serving
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:500])

    def Describe(self, request, context):
        from fedmoe.client import site

        def go():
            info = site.describe(self.settings)
            reply = site_daemon_pb2.DescribeReply(
                info={k: str(v) for k, v in info.items() if not isinstance(v, (int, float))},
                numbers={k: float(v) for k, v in info.items() if isinstance(v, (int, float))})
            self.audit.write({"message": "describe", "run_id": request.run_id, "sent": info})
            return reply

        return self._run(context, go)

    def Train(self, request, context):
        from fedmoe.client import site
        from fedmoe.shared.delta import LoraDelta
        from fedmoe.shared.training import TrainConfig

        def go():
            received = LoraDelta.from_proto(request.adapter)
            cfg = TrainConfig(steps=request.steps, batch_size=request.batch_size, lr=request.lr, seed=request.seed,
                              prox_mu=request.prox_mu)
            self.log(f"train: run {request.run_id} round {request.round} expert {request.expert}, {cfg.steps} steps")
            started = time.perf_counter()
            trained, metrics = site.train(self.settings, received, cfg)
            reply = site_daemon_pb2.TrainReply(adapter=trained.to_proto(), metrics={k: float(v) for k, v in metrics.items()})
            self.audit.write({"message": "train", "run_id": request.run_id, "round": request.round, "expert": request.expert,
                              "received_sha256": request.adapter.checksum, "sent": delta_summary(reply.adapter),
                              "metrics": dict(reply.metrics)})
            self.log(f"train: done in {time.perf_counter() - started:.1f}s, loss {metrics.get('train-loss', float('nan')):.3f}")
            return reply

        return self._run(context, go)

    def Evaluate(self, request, context):
        from fedmoe.client import site
        from fedmoe.shared.delta import LoraDelta

        def go():
            metrics = site.evaluate(self.settings, LoraDelta.from_proto(request.adapter))
            reply = site_daemon_pb2.EvaluateReply(metrics={k: float(v) for k, v in metrics.items()})
            self.audit.write({"message": "evaluate", "run_id": request.run_id, "round": request.round,
                              "received_sha256": request.adapter.checksum, "metrics": dict(reply.metrics)})
            return reply

        return self._run(context, go)


def serve(settings, address: str, audit_path: str | Path, log=None, workers: int = 4) -> tuple[grpc.Server, str]:
    """Load the site's data and model, then serve on `address`; returns (server, bound address)."""
    from fedmoe.client import site

    check_local_address(address)
    info = site.describe(settings)  # loads data and model now: errors show before the site joins
    if log:
        log(f"site daemon: {info['site']} ({info['domain']}, {info['num-examples']} training examples), "
            f"rank {info['rank']}, {info['quant']} base model {info['fingerprint']}")
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=CHANNEL_OPTIONS)
    site_daemon_pb2_grpc.add_SiteDaemonServicer_to_server(SiteDaemonServicer(settings, AuditLog(audit_path), log), server)
    port = server.add_insecure_port(address)  # local only (checked above): a Unix socket or loopback
    if port == 0:
        raise FedmoeError(f"site daemon could not listen on {address}")
    server.start()
    if not address.startswith("unix:") and address.endswith(":0"):
        address = address[: -len(":0")] + f":{port}"
    return server, address


# -- the forwarding side (used by the ClientApp; no torch) ----------------------------------

_channels: dict[str, grpc.Channel] = {}


def stub_for(address: str, connect_timeout: float = 30.0):
    check_local_address(address)
    if address not in _channels:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            channel.close()
            raise FedmoeError(f"site daemon at {address} is not reachable (is `fedmoe site start` running?)") from None
        _channels[address] = channel
    return site_daemon_pb2_grpc.SiteDaemonStub(_channels[address])


def call(address: str, method: str, request, timeout: float):
    try:
        return getattr(stub_for(address), method)(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise FedmoeError(f"site daemon {method}: {exc.details() or exc.code().name}") from None


def records_to_proto(arrays, config):
    """Flower ArrayRecord + ConfigRecord metadata -> fedmoe.v1.LoraDelta, bytes as they are."""
    for key in ("rank", "alpha", "base-fingerprint"):
        if key not in config:
            raise FedmoeError(f"adapter metadata lacks {key!r}")
    msg = lora_delta_pb2.LoraDelta(rank=int(config["rank"]), alpha=float(config["alpha"]),
                                   base_fingerprint=str(config["base-fingerprint"]), checksum=str(config.get("checksum", "")))
    for name in sorted(arrays):
        arr = arrays[name].numpy()
        msg.tensors.add(name=name, dtype=str(arr.dtype), shape=list(arr.shape), data=arr.astype(arr.dtype.newbyteorder("<")).tobytes(order="C"))
    return msg


def proto_to_records(msg):
    """fedmoe.v1.LoraDelta -> (ArrayRecord, ConfigRecord) as `LoraDelta.to_records` makes them."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays = ArrayRecord({t.name: Array(np.frombuffer(t.data, dtype=np.dtype(t.dtype).newbyteorder("<")).reshape(tuple(t.shape)))
                          for t in msg.tensors})
    config = ConfigRecord({"rank": int(msg.rank), "alpha": float(msg.alpha), "base-fingerprint": msg.base_fingerprint,
                           "checksum": msg.checksum})
    return arrays, config


def forward_describe(address: str, run_id: int, timeout: float) -> dict:
    reply = call(address, "Describe", site_daemon_pb2.DescribeRequest(run_id=run_id), timeout)
    info: dict = dict(reply.info)
    info.update({k: int(v) if k in INT_KEYS else v for k, v in reply.numbers.items()})
    return info


def forward_train(address: str, arrays, config, run_id: int, timeout: float):
    """Returns (ArrayRecord, ConfigRecord, metrics dict) of the trained adapter."""
    request = site_daemon_pb2.TrainRequest(
        adapter=records_to_proto(arrays, config), steps=int(config["steps"]), batch_size=int(config["batch-size"]),
        lr=float(config["lr"]), seed=int(config["seed"]), prox_mu=float(config.get("prox-mu", 0.0)), run_id=run_id,
        round=int(config.get("round", 0)), expert=str(config.get("expert", "")))
    reply = call(address, "Train", request, timeout)
    out_arrays, meta = proto_to_records(reply.adapter)
    metrics = {k: int(v) if k in INT_KEYS else v for k, v in reply.metrics.items()}
    return out_arrays, meta, metrics


def forward_evaluate(address: str, arrays, config, run_id: int, timeout: float) -> dict:
    request = site_daemon_pb2.EvaluateRequest(adapter=records_to_proto(arrays, config), run_id=run_id,
                                              round=int(config.get("round", 0)))
    reply = call(address, "Evaluate", request, timeout)
    return {k: int(v) if k in INT_KEYS else v for k, v in reply.metrics.items()}
