"""`fedmoe serve` (a run's experts behind the gRPC InferenceService and, with
`--http-port`, the OpenAI-compatible HTTP API; on a live run each newly committed round is
swapped in, see `serving/hot_swap.py`) and `fedmoe ask` (the gRPC client).

`serve` is built from `add_serve_arguments` + `start_from_args`, so another front end
(an HTTP port, a dashboard) can add its flags and reuse the same served model.

Every call needs the serve token (`authorization: Bearer <token>`): from --token-file,
$FEDMOE_SERVE_TOKEN or --token (which other users see in `ps`), else a new one printed
once. A --host other than loopback needs TLS (--tls-cert/--tls-key): the token must not
cross a network in the clear.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from fedmoe.server.ops.access import add_tls_arguments, add_token_arguments, check_tls, read_token
from fedmoe.shared.cli import add_json_flag, print_json
from fedmoe.shared.errors import FedmoeError

TOKEN_ENV = "FEDMOE_SERVE_TOKEN"


def resolve_token(args) -> str | None:
    """--token-file, then $FEDMOE_SERVE_TOKEN, then --token; None if none is given."""
    return read_token(args.token_file, TOKEN_ENV, args.token)


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a run's gated experts (a live run's newest round) over gRPC and an OpenAI-compatible HTTP API")
    add_serve_arguments(p)
    from fedmoe.server.commands.dashboard import add_operator_flags

    # --dashboard-port, --operator-port, --dashboard-host, --dashboard-token
    add_operator_flags(p, embedded=True, http_flag="--dashboard-port")
    add_json_flag(p)
    p.set_defaults(func=cmd_serve)

    a = sub.add_parser("ask", help="ask a running `fedmoe serve` for a routed answer")
    a.add_argument("prompt", help="the prompt")
    a.add_argument("--addr", required=True, help="HOST:PORT of the server")
    a.add_argument("--gate", default="", help="gate to route with (default: the server's)")
    a.add_argument("--max-new-tokens", type=int, default=0, help="tokens to generate (default: the server's, 16)")
    a.add_argument("--top-k", type=int, default=0, help="experts to mix (default 1)")
    a.add_argument("--route", action="store_true", help="only show the gate's expert distribution")
    a.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")
    add_token_arguments(a, "the server's", TOKEN_ENV)
    a.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to check a TLS server against")
    add_json_flag(a)
    a.set_defaults(func=cmd_ask)


def add_serve_arguments(p) -> None:
    p.add_argument("--run", required=True, help="run folder (from fedmoe simulate or the coordinator)")
    p.add_argument("--gate", help="default gate: arrow | prototype | learned (default: the run's best)")
    p.add_argument("--grpc-port", type=int, default=50061, help="gRPC port (0 = any free port; default 50061)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--max-batch", type=int, default=16, help="most requests run as one batch (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long to gather a batch (default 10 ms)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting at most; more get RESOURCE_EXHAUSTED (gRPC) or 429 (HTTP) (default 64)")
    add_token_arguments(p, "serve", TOKEN_ENV)
    add_tls_arguments(p, "serve gRPC and the HTTP API")
    p.add_argument("--http-port", type=int, default=None,
                   help="OpenAI-compatible HTTP API (/v1) on this port (0 = any free port; default: off)")
    p.add_argument("--api-key-file", default=None,
                   help="API keys for the HTTP API, one per line (default: $FEDMOE_API_KEY, else a new key printed once)")
    p.add_argument("--reload-interval", type=float, default=None,
                   help="seconds between looks at run.db for a newly committed round, whose experts are then swapped "
                        "in between batches (0 = off; default 2 on a run that is not finished, else off)")


def start_from_args(args):
    """Load the run and start the gRPC server; returns the `Serving`."""
    from fedmoe.server.serving.inference import Serving, best_gate, load_served_run

    if not 0 <= args.grpc_port <= 65535:
        raise FedmoeError(f"--grpc-port must be between 0 and 65535, got {args.grpc_port}")
    if args.max_batch < 1:
        raise FedmoeError(f"--max-batch must be >= 1, got {args.max_batch}")
    tls_files = check_tls(args.host, args.tls_cert, args.tls_key)
    tls = tls_files.pem() if tls_files else None
    token = resolve_token(args)
    interval = reload_interval(args)  # checked before the model loads
    served = load_served_run(args.run, args.device)
    gate = args.gate or best_gate(args.run, list(served.gates))
    if gate not in served.gates:
        raise FedmoeError(f"gate {gate!r} is not available for run {args.run}: it has {', '.join(served.gates)}")
    serving = Serving(served, gate, args.host, args.grpc_port, args.max_batch, args.batch_wait_ms / 1000, token=token,
                      max_queue=args.max_queue, tls=tls)
    serving.token_generated = token is None
    if interval:
        from fedmoe.server.serving.hot_swap import RoundWatcher

        serving.watcher = RoundWatcher(served, args.run, interval)
    return serving


def reload_interval(args) -> float:
    """Seconds between the hot-swap watcher's looks at run.db (0: off): --reload-interval,
    by default on for a run whose run.db says it is not finished."""
    from fedmoe.server.serving.hot_swap import DEFAULT_INTERVAL, run_state

    interval = args.reload_interval
    if interval is not None and not interval >= 0:
        raise FedmoeError(f"--reload-interval must be >= 0 seconds, got {interval}")
    try:
        state, _ = run_state(args.run)
    except Exception as exc:  # sqlite3.Error: not a database, locked...
        raise FedmoeError(f"{args.run}/run.db: {exc}") from None
    if interval is None:
        return DEFAULT_INTERVAL if state not in (None, "finished") else 0.0
    if interval > 0 and state is None:
        raise FedmoeError(f"--reload-interval: run {args.run} has no run.db to follow")
    return interval


def http_api_keys(args) -> tuple[list[str], bool] | None:
    """Check the HTTP API flags (before the model loads) and read its keys; None without
    --http-port."""
    from fedmoe.server.serving.openai_api import load_api_keys

    if args.http_port is None:
        if args.api_key_file:
            raise FedmoeError("--api-key-file needs --http-port (the HTTP API is off without it)")
        return None
    if not 0 <= args.http_port <= 65535:
        raise FedmoeError(f"--http-port must be between 0 and 65535, got {args.http_port}")
    if args.max_queue < 1:
        raise FedmoeError(f"--max-queue must be >= 1, got {args.max_queue}")
    return load_api_keys(args.api_key_file)


def start_http_api(args, serving, keys: tuple[list[str], bool] | None):
    """The OpenAI-compatible API beside the gRPC server, over the same served model;
    None without --http-port. A key made here is printed once, on stderr."""
    from fedmoe.server.serving.openai_api import OpenAIServer

    if keys is None:
        return None
    keys, generated = keys
    api = OpenAIServer(serving.served, serving.default_gate, args.host, args.http_port, keys,
                       max_batch=args.max_batch, max_queue=args.max_queue, max_wait_s=args.batch_wait_ms / 1000,
                       tls=(args.tls_cert, args.tls_key) if args.tls_cert else None)
    if generated:
        print(f"HTTP API key: {keys[0]}  (shown once; send 'Authorization: Bearer <key>', or set $FEDMOE_API_KEY)",
              file=sys.stderr, flush=True)
    return api


def cmd_serve(args) -> int:
    from fedmoe.server.commands.dashboard import operator_args
    from fedmoe.server.commands.dashboard import start_from_args as start_operator_endpoints

    keys = http_api_keys(args)
    ops = operator_args(args)  # the dashboard's flags, checked before the model loads
    serving = start_from_args(args)
    served = serving.served
    try:
        api = start_http_api(args, serving, keys)
    except BaseException:
        serving.stop()
        raise
    try:
        operator = start_operator_endpoints(args, args.run, out=lambda text: print(text, file=sys.stderr, flush=True), ops=ops,
                                            serving=served.swap_status)
    except BaseException:
        if api is not None:
            api.stop()
        serving.stop()
        raise
    info = {"address": f"{serving.host}:{serving.port}", "port": serving.port, "run": args.run,
            "experts": served.experts, "gates": list(served.gates), "default_gate": serving.default_gate,
            "tls": bool(args.tls_cert), "round": served.round,
            "reload_interval": serving.watcher.interval if serving.watcher else 0}
    if serving.token_generated:  # a token the operator gave is not echoed; a new one is shown once
        info["token"] = serving.token
    if api is not None:
        info["http"] = {"url": api.url, "port": api.port,
                        "models": ["fedmoe"] + [f"expert/{e}" for e in served.experts]}
    if operator is not None:
        info["dashboard"] = operator.info()
    if args.json:
        print_json(info)
    else:
        print(f"serving {args.run} on {info['address']}: experts {', '.join(served.experts)}; "
              f"gates {', '.join(served.gates)} (default {serving.default_gate})"
              + (f"; round {served.round}" if served.round else "")
              + (f"; following new rounds every {serving.watcher.interval:g} s" if serving.watcher else ""))
        if serving.token_generated:
            print(f"serve token: {serving.token}  (shown once; fedmoe ask needs it: ${TOKEN_ENV} or --token-file)")
        if api is not None:
            print(f"OpenAI-compatible API: {api.url}  (models: {', '.join(info['http']['models'])})")
    sys.stdout.flush()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if api is not None:
        api.stop()
    serving.stop()
    if operator is not None:
        operator.stop()
    return 0


def cmd_ask(args) -> int:
    import grpc

    from fedmoe.protos import inference_pb2 as pb
    from fedmoe.protos import inference_pb2_grpc as pb_grpc

    token = resolve_token(args)
    if token is None:
        raise FedmoeError(f"fedmoe ask needs the server's token: ${TOKEN_ENV}, --token-file or --token")
    metadata = [("authorization", f"Bearer {token}")]
    if args.tls_ca:
        try:
            creds = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
        except OSError as exc:
            raise FedmoeError(f"--tls-ca {args.tls_ca}: {exc.strerror}") from None
        channel = grpc.secure_channel(args.addr, creds)
    else:
        channel = grpc.insecure_channel(args.addr)
    with channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        try:
            if args.route:
                reply = stub.Route(pb.RouteRequest(prompt=args.prompt, gate=args.gate), timeout=args.timeout, metadata=metadata)
            else:
                reply = stub.Generate(pb.GenerateRequest(prompt=args.prompt, gate=args.gate, top_k=args.top_k,
                                                         max_new_tokens=args.max_new_tokens), timeout=args.timeout,
                                      metadata=metadata)
        except grpc.RpcError as exc:
            raise FedmoeError(f"{args.addr}: {exc.code().name}: {exc.details()}") from None
    experts = {e.expert: e.weight for e in reply.experts}
    if args.json:
        print_json({"gate": reply.gate, "experts": experts, "round": reply.round or None}
                   | ({} if args.route else {"text": reply.text}))
        return 0
    if not args.route:
        print(reply.text)
    print("  ".join(f"{e} {w:.2f}" for e, w in experts.items()) + f"  (gate {reply.gate})",
          file=sys.stderr if not args.route else sys.stdout)
    return 0
