"""The site daemon: a long-lived local gRPC server that holds the site's model and data.

Flower's deployment engine starts a fresh ClientApp process for every message, so a
model loaded there would be loaded again every round. `fedmoe site start` runs this
daemon instead: it loads the (quantized) base model once, is the only process that
reads the site's data, runs `fedmoe.client.site` for each request, and appends one
JSON line per reply to an audit log saying exactly what left the site (tensor names,
shapes, dtypes, bytes, a sha256 of the payload, the metrics; never data).
The ClientApp forwards to it with the helpers at the bottom of this module, which
import neither torch nor the site code, so a forwarding ClientApp process starts fast.

The service listens on a Unix socket or a loopback address only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from pathlib import Path

import grpc

from fedmoe.protos import site_daemon_pb2, site_daemon_pb2_grpc
from fedmoe.shared.errors import FedmoeError, SitePolicyError
from fedmoe.shared.network import is_loopback_host, split_host_port

MAX_MESSAGE_BYTES = 2**31 - 1  # adapters of large models are far over gRPC's 4 MB default
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


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


def payload_summary(payload) -> dict:
    """What an audit entry records about a payload: names, shapes, sizes and a sha256 over
    them and the bytes; never the values."""
    h = hashlib.sha256()
    for t in payload.tensors:
        h.update(t.name.encode())
        h.update(t.dtype.encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.data)
    config = json.loads(payload.config_json or "{}")
    return {"sha256": h.hexdigest(), "bytes": sum(len(t.data) for t in payload.tensors),
            "checksum": config.get("checksum"), "codec": config.get("codec"),
            "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": len(t.data)} for t in payload.tensors]}


class SiteDaemonServicer(site_daemon_pb2_grpc.SiteDaemonServicer):
    """Runs the same functions as an in-process ClientApp (fedmoe.client.client_app)."""

    def __init__(self, settings, audit: AuditLog, log=None):
        self.settings = settings
        self.audit = audit
        self.log = log or (lambda text: None)
        # One model per site: requests (e.g. two experts' TRAIN in one round) run one at a time.
        self._lock = threading.Lock()

    def _run(self, context, fn):
        try:
            with self._lock:
                return fn()
        except SitePolicyError as exc:  # refused under the site's policy: the forwarder raises it again
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except FedmoeError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:  # report, keep serving
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"[:500])

    def Describe(self, request, context):
        from fedmoe.client import site

        def go():
            info = site.describe(self.settings)
            self.audit.write({"message": "describe", "run_id": request.run_id, "sent": info})
            return site_daemon_pb2.DescribeReply(info_json=json.dumps(info))

        return self._run(context, go)

    def Train(self, request, context):
        from fedmoe.client.jobs import train_in_process

        arrived = time.time()

        def go():
            arrays, config = payload_to_records(request.payload)
            rnd, expert = config.get("round"), config.get("expert")
            self.log(f"train: run {request.run_id} round {rnd} expert {expert}, {config.get('steps')} steps")
            started = time.perf_counter()
            try:
                out_arrays, meta, metrics = train_in_process(self.settings, arrays, config)
            except SitePolicyError as exc:  # nothing was trained or sent; the refusal is audited
                self.audit.write({"message": "train", "run_id": request.run_id, "round": rnd, "expert": expert,
                                  "arrived": arrived, "privacy": config.get("privacy"), "refused": str(exc)})
                self.log(f"train: {exc}")
                raise
            reply = site_daemon_pb2.TrainReply(payload=records_to_payload(out_arrays, meta), metrics_json=json.dumps(metrics))
            self.audit.write({"message": "train", "run_id": request.run_id, "round": rnd, "expert": expert,
                              "arrived": arrived, "received_checksum": config.get("checksum"),
                              "sent": payload_summary(reply.payload), "metrics": metrics})
            self.log(f"train: done in {time.perf_counter() - started:.1f}s, loss {metrics.get('train-loss', float('nan')):.3f}")
            return reply

        return self._run(context, go)

    def Evaluate(self, request, context):
        from fedmoe.client.jobs import evaluate_in_process

        def go():
            arrays, config = payload_to_records(request.payload)
            metrics = evaluate_in_process(self.settings, arrays, config)
            self.audit.write({"message": "evaluate", "run_id": request.run_id, "round": config.get("round"),
                              "received_checksum": config.get("checksum"), "metrics": metrics})
            return site_daemon_pb2.EvaluateReply(metrics_json=json.dumps(metrics))

        return self._run(context, go)


def serve(settings, address: str, audit_path: str | Path, log=None, workers: int = 4) -> tuple[grpc.Server, str]:
    """Load the site's data and model, then serve on `address`; returns (server, bound address)."""
    from fedmoe.client import site

    check_local_address(address)
    info = site.describe(settings)  # reads the data: errors show before the site joins
    site.trainer_for(settings)  # loads (and quantizes) the model once, now, not in round 1
    # Import now what the first TRAIN would import (Flower records, codecs, privacy): measured
    # ~20 s of round 1 on a loaded 2-core machine otherwise.
    import flwr.app  # noqa: F401
    import fedmoe.client.jobs  # noqa: F401
    import fedmoe.client.privacy  # noqa: F401
    import fedmoe.shared.compression  # noqa: F401
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
        if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
            raise SitePolicyError(exc.details() or "site policy: refused") from None
        raise FedmoeError(f"site daemon {method}: {exc.details() or exc.code().name}") from None


def _jsonable(value):
    if isinstance(value, bytes):
        return {"__bytes__": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _unjson(value):
    if isinstance(value, dict) and "__bytes__" in value:
        return base64.b64decode(value["__bytes__"])
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    return value


def records_to_payload(arrays, config):
    """Flower ArrayRecord + ConfigRecord -> Payload, array bytes as they are."""
    payload = site_daemon_pb2.Payload(config_json=json.dumps({k: _jsonable(v) for k, v in dict(config).items()}))
    for name in arrays:
        arr = arrays[name].numpy()
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        payload.tensors.add(name=name, dtype=arr.dtype.name, shape=list(arr.shape), data=arr.tobytes(order="C"))
    return payload


def payload_to_records(payload):
    """Payload -> (ArrayRecord, ConfigRecord), as the Flower message carried them."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord

    arrays = ArrayRecord({t.name: Array(np.frombuffer(t.data, dtype=np.dtype(t.dtype).newbyteorder("<")).reshape(tuple(t.shape)))
                          for t in payload.tensors})
    config = ConfigRecord({k: _unjson(v) for k, v in json.loads(payload.config_json or "{}").items()})
    return arrays, config


def forward_describe(address: str, run_id: int, timeout: float) -> dict:
    reply = call(address, "Describe", site_daemon_pb2.DescribeRequest(run_id=run_id), timeout)
    return json.loads(reply.info_json)


def forward_train(address: str, arrays, config, run_id: int, timeout: float):
    """Returns (ArrayRecord, ConfigRecord, metrics dict) of the site's reply."""
    request = site_daemon_pb2.TrainRequest(payload=records_to_payload(arrays, config), run_id=run_id)
    reply = call(address, "Train", request, timeout)
    out_arrays, meta = payload_to_records(reply.payload)
    return out_arrays, meta, json.loads(reply.metrics_json)


def forward_evaluate(address: str, arrays, config, run_id: int, timeout: float) -> dict:
    request = site_daemon_pb2.EvaluateRequest(payload=records_to_payload(arrays, config), run_id=run_id)
    return json.loads(call(address, "Evaluate", request, timeout).metrics_json)
