"""`fedmoe dashboard` (web dashboard + operator gRPC API over a run folder) and
`fedmoe status` (the operator API's answer, as a table or JSON).

The coordinator and `fedmoe serve` start the same two servers with
`start_operator_endpoints(...)`; this module is the stand-alone way, for any run folder,
finished or live.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedmoe.server.ops.access import add_tls_arguments, add_token_arguments, check_tls, read_token
from fedmoe.shared.cli import add_json_flag, print_json
from fedmoe.shared.errors import FedmoeError

TOKEN_ENV = "FEDMOE_OPERATOR_TOKEN"
DEFAULT_HTTP_PORT = 8765
DEFAULT_GRPC_PORT = 9765


def add_operator_flags(p, embedded: bool = False, http_flag: str = "--http-port") -> None:
    """The dashboard + operator API flags. `embedded` (for `fedmoe coordinator start` and
    `fedmoe serve`, whose --host/--token/--tls-*/--grpc-port mean other things): --http-port,
    --operator-port, and --dashboard-{host,token,token-file,tls-cert,tls-key}, both servers
    off unless a port is given. Stand-alone (`fedmoe dashboard`): --http-port, --grpc-port,
    --host, --token, --token-file, --tls-cert, --tls-key. `http_flag` renames the
    dashboard's port flag (`fedmoe serve`: --dashboard-port, since its --http-port is the
    OpenAI-compatible API). Read them with `operator_args`."""
    prefix = "dashboard-" if embedded else ""
    grpc_flag = "--operator-port" if embedded else "--grpc-port"
    http_default, grpc_default = (None, None) if embedded else (DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT)
    off = " (default: off)" if embedded else ""
    p.add_argument(http_flag, dest="dashboard_port", type=int, default=http_default,
                   help="web dashboard port (0: any free port)" + (off or f"; default {http_default}"))
    p.add_argument(grpc_flag, dest="operator_port", type=int, default=grpc_default,
                   help="operator gRPC API port, for `fedmoe status` (0: any free port; -1: off)" + (off or f"; default {grpc_default}"))
    p.add_argument(f"--{prefix}host", dest="dashboard_host", default="127.0.0.1",
                   help="address the dashboard and operator API bind (default 127.0.0.1: this machine only; "
                        f"any other needs --{prefix}tls-cert/--{prefix}tls-key)")
    add_token_arguments(p, "dashboard and operator API", TOKEN_ENV, prefix, dest="dashboard_")
    add_tls_arguments(p, "the dashboard (HTTPS) and operator API", prefix, dest="dashboard_")
    p.set_defaults(operator_flag_prefix=prefix)  # so errors name the flags this command has


@dataclass
class OperatorArgs:
    """What add_operator_flags asked for, checked: host, TLS files, token (None: make one)."""

    host: str
    http_port: int | None
    grpc_port: int | None
    tls: object | None  # access.TLSFiles
    token: str | None

    @property
    def wanted(self) -> bool:
        return any(p is not None and p >= 0 for p in (self.http_port, self.grpc_port))


def operator_args(args) -> OperatorArgs:
    """Check the flags of add_operator_flags in one line each (before anything starts):
    ports, TLS files (a non-loopback host needs them), the token (--token-file, then
    $FEDMOE_OPERATOR_TOKEN, then --token)."""
    prefix = args.operator_flag_prefix
    for name in ("dashboard_port", "operator_port"):
        port = getattr(args, name)
        if port is not None and not -1 <= port <= 65535:
            raise FedmoeError(f"port {port} is out of range (0-65535; 0 picks a free one, -1 turns the server off)")
    ops = OperatorArgs(args.dashboard_host, args.dashboard_port, args.operator_port, None, None)
    if not ops.wanted:
        return ops
    ops.tls = check_tls(args.dashboard_host, args.dashboard_tls_cert, args.dashboard_tls_key, f"--{prefix}host", prefix)
    ops.token = read_token(args.dashboard_token_file, TOKEN_ENV, args.dashboard_token, f"--{prefix}token-file")
    return ops


def start_from_args(args, run_dir: str | Path, out=print, ops: OperatorArgs | None = None,
                    serving=None) -> "OperatorEndpoints | None":
    """For commands that took add_operator_flags(embedded=True): start what was asked for,
    print the banner (a new token, once), return the handle (None if nothing was asked).
    `ops`: operator_args(args), if the command checked its flags already; `serving`: see
    start_operator_endpoints."""
    ops = ops or operator_args(args)
    if not ops.wanted:
        return None
    ends = start_operator_endpoints(run_dir, ops.host, ops.http_port, ops.grpc_port, ops.token, ops.tls, serving)
    out(ends.banner())
    return ends


def register(sub) -> None:
    d = sub.add_parser("dashboard", help="web dashboard and operator gRPC API for a run folder (finished or live)")
    d.add_argument("--run", required=True, help="run folder (holds run.db; a live coordinator's --out)")
    add_operator_flags(d)
    add_json_flag(d)
    d.set_defaults(func=cmd_dashboard)

    s = sub.add_parser("status", help="how a federation is going, from the operator API of a coordinator or dashboard")
    s.add_argument("--addr", default=f"127.0.0.1:{DEFAULT_GRPC_PORT}", help=f"operator API address (default 127.0.0.1:{DEFAULT_GRPC_PORT})")
    add_token_arguments(s, "operator API", TOKEN_ENV)
    s.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to check a TLS operator API against")
    s.add_argument("--watch", action="store_true", help="then follow the run's events until interrupted")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer (default 10)")
    add_json_flag(s)
    s.set_defaults(func=cmd_status)


# -- serving --------------------------------------------------------------------------------------

@dataclass
class OperatorEndpoints:
    """The dashboard and operator API of one run folder; `stop()` ends both."""

    token: str
    dashboard: object | None = None
    operator: object | None = None
    token_generated: bool = True  # made here: shown once; a token the operator gave is never echoed
    tls: bool = False

    @property
    def url(self) -> str | None:
        return self.dashboard.url if self.dashboard else None

    @property
    def grpc_address(self) -> str | None:
        return self.operator.address if self.operator else None

    def info(self) -> dict:
        shown = self.token_generated and self.dashboard
        return {"dashboard": self.url, "dashboard_with_token": self.dashboard.url_with_token if shown else None,
                "operator_api": self.grpc_address, "tls": self.tls} | ({"token": self.token} if self.token_generated else {})

    def banner(self) -> str:
        lines = []
        if self.dashboard:
            lines.append(f"dashboard:    {self.dashboard.url_with_token if self.token_generated else self.dashboard.url}")
        if self.operator:
            ca = " --tls-ca CA.crt" if self.tls else ""
            lines.append(f"operator API: {self.grpc_address}  (fedmoe status --addr {self.grpc_address}{ca}, "
                         f"token in ${TOKEN_ENV} or --token-file)")
        if self.token_generated:
            lines.append(f"access token: {self.token}  (shown once; required on every page and call)")
        else:
            lines.append("access token: the one given (required on every page and call)")
        return "\n".join(lines)

    def stop(self) -> None:
        for server in (self.dashboard, self.operator):
            if server is not None:
                server.stop()


def start_operator_endpoints(run_dir: str | Path, host: str = "127.0.0.1", http_port: int | None = DEFAULT_HTTP_PORT,
                             grpc_port: int | None = DEFAULT_GRPC_PORT, token: str | None = None,
                             tls=None, serving=None) -> OperatorEndpoints:
    """Start the dashboard (unless http_port is None/-1) and the operator API (unless
    grpc_port is None/-1) for `run_dir`, sharing one token (None: a new one) and one TLS
    certificate (`tls`: access.TLSFiles; a non-loopback host needs it). Print `.banner()`
    once so the operator learns a new token. `serving` (fedmoe serve): a callable giving the
    served model's swap status, which the dashboard shows as the round it serves."""
    from fedmoe.server.ops.access import new_token
    from fedmoe.server.ops.dashboard import start_dashboard

    ends = OperatorEndpoints(token or new_token(), token_generated=token is None, tls=tls is not None)
    try:
        if http_port is not None and http_port >= 0:
            ends.dashboard = start_dashboard(run_dir, host=host, port=http_port, token=ends.token, tls=tls,
                                             serving=serving)
        if grpc_port is not None and grpc_port >= 0:
            from fedmoe.server.ops.operator_service import start_operator_server

            ends.operator = start_operator_server(run_dir, host=host, port=grpc_port, token=ends.token, tls=tls)
    except BaseException:
        ends.stop()
        raise
    return ends


def cmd_dashboard(args) -> int:
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise FedmoeError(f"run folder not found: {run_dir}")
    ops = operator_args(args)
    if not ops.wanted:
        raise FedmoeError("--http-port -1 and --grpc-port -1: nothing to serve")
    if not (run_dir / "run.db").is_file():
        print(f"fedmoe: {run_dir} has no run.db yet; the dashboard shows the run once the coordinator starts it", file=sys.stderr)
    ends = start_operator_endpoints(run_dir, ops.host, ops.http_port, ops.grpc_port, ops.token, ops.tls)
    if args.json:
        print_json(ends.info())
    else:
        print(ends.banner())
    sys.stdout.flush()
    wait_for_signal()
    ends.stop()
    return 0


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):
        pass


# -- fedmoe status --------------------------------------------------------------------------------

def fmt_duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(max(0.0, s)))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h {m}m" if h else f"{m}m {sec}s" if m else f"{sec}s"


def fmt_bytes(b: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if b < 1000 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return str(b)


def fmt_ago(t: float) -> str:
    if not t:
        return "never"
    s = time.time() - t
    return f"{s:.0f} s ago" if s < 90 else f"{s / 60:.0f} min ago" if s < 5400 else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def status_table(run: dict, rounds: list[dict], sites: list[dict]) -> str:
    eta = fmt_duration(run["eta_seconds"]) if run["state"] == "running" else ("-" if run["state"] == "waiting" else "done")
    out = [f"run       {run['run_dir']}  (preset {run['preset'] or '-'}, seed {run['seed']})",
           f"state     {run['state']}   round {run['current_round']}/{run['total_rounds'] or '?'} ({run['committed_rounds']} committed)"
           f"   elapsed {fmt_duration(run['elapsed_seconds'])}   time left {eta}",
           f"sites     {run['sites']}   rejected updates {run['rejections']}   traffic {fmt_bytes(run['bytes_sent'])} up / "
           f"{fmt_bytes(run['bytes_received'])} down",
           f"experts   {', '.join(run['experts']) or '-'}", ""]
    experts = run["experts"]
    if rounds:
        out.append("round  state      time     " + "".join(f"{e + ' loss':>16}" for e in experts))
        for r in rounds:
            m = {e["expert"]: e["metrics"] for e in r["experts"]}
            losses = "".join(f"{m[e]['train_loss']:>16.4f}" if e in m and "train_loss" in m[e] else f"{'-':>16}" for e in experts)
            out.append(f"{r['round']:>5}  {r['state']:<10} {fmt_duration(r['seconds']):<8} {losses}")
        out.append("")
    if sites:
        out.append(f"{'site':<14}{'domain':<14}{'rank':>5}  {'last seen':<12}{'rounds':>7}{'failures':>9}{'rejected':>9}"
                   f"{'bytes sent':>12}{'bytes recv':>12}")
        for s in sites:
            out.append(f"{(s['site'] or s['node_id'])[:13]:<14}{s['domain'][:13]:<14}{s['rank']:>5}  {fmt_ago(s['last_seen']):<12}"
                       f"{s['rounds_joined']:>7}{s['failures']:>9}{s['rejections']:>9}{fmt_bytes(s['bytes_sent']):>12}"
                       f"{fmt_bytes(s['bytes_received']):>12}")
    return "\n".join(out).rstrip()


def cmd_status(args) -> int:
    from fedmoe.server.ops.operator_service import OperatorClient

    token = read_token(args.token_file, TOKEN_ENV, args.token)
    if not token:
        raise FedmoeError(f"fedmoe status needs the operator token: --token-file FILE, ${TOKEN_ENV} or --token T")
    client = OperatorClient(args.addr, token, timeout=args.timeout, tls_ca=args.tls_ca)
    try:
        run, rounds, sites = client.run(), client.rounds(), client.sites()
        if args.json:
            print_json({"addr": args.addr, "run": run, "rounds": rounds, "sites": sites})
        else:
            print(status_table(run, rounds, sites))
        sys.stdout.flush()
        if args.watch:
            for event in client.watch():
                if event.get("kind") != "snapshot":
                    if args.json:
                        print_json(event)
                    else:
                        print(f"{time.strftime('%H:%M:%S', time.localtime(event['time']))}  {event['message']}")
                    sys.stdout.flush()
    finally:
        client.close()
    return 0
