"""`fedmoe dashboard` (web dashboard + operator gRPC API over a run folder) and
`fedmoe status` (the operator API's answer, as a table or JSON).

The coordinator and `fedmoe serve` start the same two servers with
`start_operator_endpoints(...)`; this module is the stand-alone way, for any run folder,
finished or live.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedmoe.shared.cli import add_json_flag, print_json
from fedmoe.shared.errors import FedmoeError

TOKEN_ENV = "FEDMOE_OPERATOR_TOKEN"
DEFAULT_HTTP_PORT = 8765
DEFAULT_GRPC_PORT = 9765


def add_operator_flags(p, embedded: bool = False, http_flag: str = "--http-port") -> None:
    """The dashboard + operator API flags. `embedded` (for `fedmoe coordinator start` and
    `fedmoe serve`, whose --host/--token/--grpc-port mean other things): --http-port,
    --operator-port, --dashboard-host, --dashboard-token, both servers off unless a port is
    given. Stand-alone (`fedmoe dashboard`): --http-port, --grpc-port, --host, --token.
    `http_flag` renames the dashboard's port flag (`fedmoe serve`: --dashboard-port, since
    its --http-port is the OpenAI-compatible API)."""
    grpc_flag, host_flag, token_flag = (("--operator-port", "--dashboard-host", "--dashboard-token") if embedded
                                        else ("--grpc-port", "--host", "--token"))
    http_default, grpc_default = (None, None) if embedded else (DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT)
    off = " (default: off)" if embedded else ""
    p.add_argument(http_flag, dest="dashboard_port", type=int, default=http_default,
                   help="web dashboard port (0: any free port)" + (off or f"; default {http_default}"))
    p.add_argument(grpc_flag, dest="operator_port", type=int, default=grpc_default,
                   help="operator gRPC API port, for `fedmoe status` (0: any free port; -1: off)" + (off or f"; default {grpc_default}"))
    p.add_argument(host_flag, dest="dashboard_host", default="127.0.0.1",
                   help="address the dashboard and operator API bind (default 127.0.0.1: this machine only)")
    p.add_argument(token_flag, dest="dashboard_token", default=None,
                   help=f"bearer token for the dashboard and operator API (default: ${TOKEN_ENV}, else a new one, printed once)")


def start_from_args(args, run_dir: str | Path, out=print) -> "OperatorEndpoints | None":
    """For commands that took add_operator_flags(embedded=True): start what was asked for,
    print the banner (the token, once), return the handle (None if nothing was asked)."""
    if args.dashboard_port is None and args.operator_port is None:
        return None
    ends = start_operator_endpoints(run_dir, args.dashboard_host, args.dashboard_port, args.operator_port, args.dashboard_token)
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
    s.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
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

    @property
    def url(self) -> str | None:
        return self.dashboard.url if self.dashboard else None

    @property
    def grpc_address(self) -> str | None:
        return self.operator.address if self.operator else None

    def info(self) -> dict:
        return {"dashboard": self.url, "dashboard_with_token": self.dashboard.url_with_token if self.dashboard else None,
                "operator_api": self.grpc_address, "token": self.token}

    def banner(self) -> str:
        lines = []
        if self.dashboard:
            lines.append(f"dashboard:    {self.dashboard.url_with_token}")
        if self.operator:
            lines.append(f"operator API: {self.grpc_address}  (fedmoe status --addr {self.grpc_address} --token {self.token})")
        lines.append(f"access token: {self.token}  (shown once; required on every page and call)")
        return "\n".join(lines)

    def stop(self) -> None:
        for server in (self.dashboard, self.operator):
            if server is not None:
                server.stop()


def resolve_token(token: str | None) -> str | None:
    return token or os.environ.get(TOKEN_ENV) or None


def start_operator_endpoints(run_dir: str | Path, host: str = "127.0.0.1", http_port: int | None = DEFAULT_HTTP_PORT,
                             grpc_port: int | None = DEFAULT_GRPC_PORT, token: str | None = None) -> OperatorEndpoints:
    """Start the dashboard (unless http_port is None/-1) and the operator API (unless
    grpc_port is None/-1) for `run_dir`, sharing one token (given, $FEDMOE_OPERATOR_TOKEN,
    or new). Print `.banner()` once so the operator learns the token."""
    from fedmoe.server.ops.dashboard import new_token, start_dashboard

    token = resolve_token(token) or new_token()
    ends = OperatorEndpoints(token)
    try:
        if http_port is not None and http_port >= 0:
            ends.dashboard = start_dashboard(run_dir, host=host, port=http_port, token=token)
        if grpc_port is not None and grpc_port >= 0:
            from fedmoe.server.ops.operator_service import start_operator_server

            ends.operator = start_operator_server(run_dir, host=host, port=grpc_port, token=token)
    except BaseException:
        ends.stop()
        raise
    return ends


def cmd_dashboard(args) -> int:
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise FedmoeError(f"run folder not found: {run_dir}")
    if not (run_dir / "run.db").is_file():
        print(f"fedmoe: {run_dir} has no run.db yet; the dashboard shows the run once the coordinator starts it", file=sys.stderr)
    ends = start_operator_endpoints(run_dir, args.dashboard_host, args.dashboard_port, args.operator_port, args.dashboard_token)
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

    token = resolve_token(args.token)
    if not token:
        raise FedmoeError(f"fedmoe status needs the operator token: --token T or ${TOKEN_ENV}")
    client = OperatorClient(args.addr, token, timeout=args.timeout)
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
