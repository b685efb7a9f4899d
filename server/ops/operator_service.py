"""`OperatorService` (protos/operator.proto): the dashboard's questions over gRPC, for
automation and `fedmoe status`.

    server = start_operator_server("runs/smoke", token="...")   # 127.0.0.1, ephemeral port
    print(server.address)                                       # "127.0.0.1:PORT"
    server.stop()

Answers come from the same `RunView` as the web dashboard, so both show the same state.
Every call needs `authorization: Bearer <token>` metadata; `TokenInterceptor` answers
anything else with UNAUTHENTICATED before the servicer runs. `tls` serves it over TLS,
which a non-loopback host needs. Bounded: `max_workers` threads answer calls, at most
`maximum_concurrent_rpcs` are in flight (RESOURCE_EXHAUSTED beyond), and `WatchEvents`
streams may hold at most half the threads, so GetRun/ListRounds/ListSites are always
answered; gRPC closes connections idle for `idle_timeout` seconds.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedmoe.protos import operator_pb2 as pb
from fedmoe.protos import operator_pb2_grpc as pb_grpc
from fedmoe.server.ops.access import TLSFiles, bearer, new_token, token_matches
from fedmoe.server.ops.dashboard import RunView, _clean, watch_events
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.network import is_loopback_host


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuse every call without `authorization: Bearer <token>` (UNAUTHENTICATED)."""

    def __init__(self, token: str):
        self.token = token

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        if token_matches(bearer(metadata.get("authorization")), self.token):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


# -- dict (RunView) -> message --------------------------------------------------------------------

def overview_message(o: dict) -> pb.RunOverview:
    msg = pb.RunOverview(run_dir=o["run_dir"], state=o["state"], preset=o["preset"] or "", seed=int(o["seed"]),
                         started=o["started"], finished=o["finished"], elapsed_seconds=o["elapsed_seconds"],
                         current_round=o["current_round"], committed_rounds=o["committed_rounds"],
                         total_rounds=o["total_rounds"], experts=o["experts"], sites=o["sites"],
                         rejections=o["rejections"], bytes_sent=o["bytes_sent"], bytes_received=o["bytes_received"])
    if o.get("eta_seconds") is not None:
        msg.eta_seconds = o["eta_seconds"]
    return msg


def round_message(r: dict) -> pb.RoundInfo:
    return pb.RoundInfo(round=r["round"], state=r["state"] or "", started=r["started"], finished=r["finished"],
                        seconds=r["seconds"], bytes_sent=r["bytes_sent"], bytes_received=r["bytes_received"],
                        rejections=r["rejections"],
                        experts=[pb.ExpertRound(expert=e["expert"], metrics={k: v for k, v in e["metrics"].items() if v is not None})
                                 for e in r["experts"]])


def site_message(s: dict) -> pb.SiteInfo:
    return pb.SiteInfo(**s)


def event_message(e: dict) -> pb.Event:
    return pb.Event(kind=e["kind"], time=e["time"], round=int(e.get("round") or 0), message=e.get("message", ""),
                    json=json.dumps(_clean(e), default=str))


# -- message -> dict (the dashboard's JSON shape; what `fedmoe status --json` prints) ---------------

def overview_dict(m: pb.RunOverview) -> dict:
    return {"run_dir": m.run_dir, "name": Path(m.run_dir).name, "state": m.state, "preset": m.preset, "seed": m.seed,
            "started": m.started, "finished": m.finished, "elapsed_seconds": m.elapsed_seconds,
            "current_round": m.current_round, "committed_rounds": m.committed_rounds, "total_rounds": m.total_rounds,
            "eta_seconds": m.eta_seconds if m.HasField("eta_seconds") else None, "experts": list(m.experts),
            "sites": m.sites, "rejections": m.rejections, "bytes_sent": m.bytes_sent, "bytes_received": m.bytes_received}


def round_dict(m: pb.RoundInfo) -> dict:
    return {"round": m.round, "state": m.state, "started": m.started, "finished": m.finished, "seconds": m.seconds,
            "experts": [{"expert": e.expert, "metrics": dict(sorted(e.metrics.items()))} for e in m.experts],
            "bytes_sent": m.bytes_sent, "bytes_received": m.bytes_received, "rejections": m.rejections}


def site_dict(m: pb.SiteInfo) -> dict:
    return {f.name: getattr(m, f.name) for f in pb.SiteInfo.DESCRIPTOR.fields}


class _Either:
    """Stops a watch when the client leaves or the server stops (the `wait` watch_events uses)."""

    def __init__(self, a: threading.Event, b: threading.Event):
        self.a, self.b = a, b

    def wait(self, timeout: float) -> bool:
        return self.a.wait(timeout) or self.a.is_set() or self.b.is_set()


class OperatorServicer(pb_grpc.OperatorServiceServicer):
    def __init__(self, view: RunView, stopping: threading.Event, poll_interval: float = 0.5, max_watchers: int = 4):
        self.view = view
        self.stopping = stopping
        self.poll_interval = poll_interval
        self.watchers = threading.BoundedSemaphore(max_watchers)  # a watch holds a worker thread while it lasts

    def GetRun(self, request, context):
        return overview_message(self.view.overview())

    def ListRounds(self, request, context):
        return pb.ListRoundsResponse(rounds=[round_message(r) for r in self.view.rounds()])

    def ListSites(self, request, context):
        return pb.ListSitesResponse(sites=[site_message(s) for s in self.view.sites()])

    def WatchEvents(self, request, context):
        if not self.watchers.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many WatchEvents streams open; try again later")
        try:
            gone = threading.Event()
            context.add_callback(gone.set)  # client gone or deadline passed
            for event in watch_events(self.view, _Either(gone, self.stopping), self.poll_interval):
                if event is not None:
                    yield event_message(event)
        finally:
            self.watchers.release()


@dataclass
class OperatorServer:
    server: grpc.Server
    host: str
    port: int
    token: str
    stopping: threading.Event = field(default_factory=threading.Event)
    tls: bool = False

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def stop(self, grace: float = 1.0) -> None:
        self.stopping.set()
        self.server.stop(grace).wait(grace + 5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_operator_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                          poll_interval: float = 0.5, max_workers: int = 8, maximum_concurrent_rpcs: int = 32,
                          tls: TLSFiles | None = None, idle_timeout: float = 300.0) -> OperatorServer:
    """Serve OperatorService for `run_dir` (finished or live). `port=0` picks a free port;
    `tls` serves it over TLS (a non-loopback `host` needs it)."""
    if token is not None and not token.strip():
        raise FedmoeError("operator token must not be empty")
    if tls is None and not is_loopback_host(host):
        raise FedmoeError(f"operator API host {host} is not loopback: it needs TLS (the token must not travel in the clear)")
    if max_workers < 2 or maximum_concurrent_rpcs < 1:
        raise FedmoeError("operator API: max_workers must be >= 2 and maximum_concurrent_rpcs >= 1")
    token = token or new_token()
    stopping = threading.Event()
    options = [("grpc.max_connection_idle_ms", int(idle_timeout * 1000)),
               ("grpc.max_receive_message_length", 64 * 1024)]  # requests are empty messages
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fedmoe-operator"),
                         interceptors=[TokenInterceptor(token)], options=options,
                         maximum_concurrent_rpcs=maximum_concurrent_rpcs)
    servicer = OperatorServicer(RunView(run_dir), stopping, poll_interval, max_watchers=max_workers // 2)
    pb_grpc.add_OperatorServiceServicer_to_server(servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is not None:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([tls.pem()]))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise FedmoeError(f"operator API cannot listen on {address}: {exc}") from None
    if not bound:
        raise FedmoeError(f"operator API cannot listen on {address}")
    server.start()
    return OperatorServer(server, host, bound, token, stopping, tls=tls is not None)


# -- client ---------------------------------------------------------------------------------------

class OperatorClient:
    """`fedmoe status` and automation: the OperatorService with the token on every call."""

    def __init__(self, address: str, token: str, timeout: float = 10.0, tls_ca: str | None = None):
        """`tls_ca`: CA certificate (PEM file) to check a TLS server against (None: plaintext)."""
        if tls_ca:
            try:
                creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
            except OSError as exc:
                raise FedmoeError(f"--tls-ca {tls_ca}: {exc.strerror or exc}") from None
            self.channel = grpc.secure_channel(address, creds)
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.OperatorServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout
        self.address = address

    def _call(self, fn, request):
        try:
            return fn(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self.address) from None

    def run(self) -> dict:
        return overview_dict(self._call(self.stub.GetRun, pb.GetRunRequest()))

    def rounds(self) -> list[dict]:
        return [round_dict(r) for r in self._call(self.stub.ListRounds, pb.ListRoundsRequest()).rounds]

    def sites(self) -> list[dict]:
        return [site_dict(s) for s in self._call(self.stub.ListSites, pb.ListSitesRequest()).sites]

    def watch(self, timeout: float | None = None):
        """Yield event dicts until the server ends the stream or `timeout` seconds pass."""
        try:
            for e in self.stub.WatchEvents(pb.WatchEventsRequest(), metadata=self.metadata, timeout=timeout):
                yield json.loads(e.json) if e.json else {"kind": e.kind, "time": e.time, "round": e.round, "message": e.message}
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return
            raise _rpc_error(exc, self.address) from None

    def close(self) -> None:
        self.channel.close()


def _rpc_error(exc: grpc.RpcError, address: str) -> FedmoeError:
    code = exc.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return FedmoeError(f"operator API at {address} refused the token (UNAUTHENTICATED)")
    if code == grpc.StatusCode.UNAVAILABLE:
        return FedmoeError(f"no operator API at {address} (UNAVAILABLE: {(exc.details() or '').splitlines()[0][:160]}): "
                           "is the coordinator or `fedmoe dashboard` running, and does --tls-ca match its TLS?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return FedmoeError(f"operator API at {address} did not answer in time")
    return FedmoeError(f"operator API at {address}: {code.name}: {exc.details()}")
