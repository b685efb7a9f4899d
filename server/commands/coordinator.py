"""`fedmoe coordinator start`: a SuperLink and our ServerApp run, until the run ends."""

from __future__ import annotations

import signal
import sys

from fedmoe.server.federation.run_config import FederationPlan
from fedmoe.shared.cli import add_json_flag, print_json
from fedmoe.shared.config import add_flags, apply_flags, to_flat

# run-config fields a deployed coordinator does not take as flags: the simulation's
# single-expert baseline (fedmoe simulate has it)
DEPLOYED_SKIP = {"single-expert"}


def register(sub) -> None:
    coord = sub.add_parser("coordinator", help="run the coordinator: a Flower SuperLink and the fedmoe ServerApp")
    csub = coord.add_subparsers(dest="coordinator_command", metavar="ACTION", required=True)
    p = csub.add_parser("start", help="start a SuperLink, run the federation to its end, then stop",
                        description="Start a Flower SuperLink, submit the fedmoe app with `flwr run`, stream its log "
                                    "until the run ends, and stop the SuperLink. Sites join with `fedmoe site start`.")
    p.add_argument("--host", default="127.0.0.1", help="address the sites reach (default 127.0.0.1): only the Fleet API is served there")
    p.add_argument("--port", type=int, default=9093, help="the sites' port (default 9093); the SuperLink's Control and Runtime APIs stay on "
                                                               "127.0.0.1 at a port of their own")
    p.add_argument("--out", help="run folder to write (run.db, experts/, logs, flwr/)")
    p.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its newest verified round, with the run "
                                                   "config it started with (the run-config flags are ignored)")
    # every run-config option, one flag per field of FederationPlan / StrategyConfig
    add_flags(p, FederationPlan, skip=DEPLOYED_SKIP)
    p.add_argument("--model", help="base model directory (default: the built-in tiny model)")
    p.add_argument("--timeout", type=float, help="give up (and stop everything) if the run has not ended after this many seconds")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication: loopback host only, for testing")
    p.add_argument("--ssl-ca-certfile", help="CA certificate (PEM) the sites trust")
    p.add_argument("--ssl-certfile", help="the SuperLink's TLS certificate (PEM)")
    p.add_argument("--ssl-keyfile", help="the SuperLink's TLS private key")
    p.add_argument("--enable-supernode-auth", action="store_true", help="accept only registered sites (needs TLS)")
    p.add_argument("--site-public-key", action="append", default=[], metavar="KEY.pub",
                   help="register a site's OpenSSH public key (repeatable; with --enable-supernode-auth)")
    p.add_argument("--quiet", action="store_true", help="do not echo the run's log (it is always in OUT/coordinator.log)")
    from fedmoe.server.commands.dashboard import add_operator_flags

    # --http-port (dashboard), --operator-port, --dashboard-{host,token,token-file,tls-cert,tls-key}
    add_operator_flags(p, embedded=True)
    add_json_flag(p)
    p.set_defaults(func=cmd_coordinator_start)


def cmd_coordinator_start(args) -> int:
    from pathlib import Path

    from fedmoe.server.federation.coordinator import Security, run_coordinator, stored_run_config
    from fedmoe.server.federation.faults import armed_faults
    from fedmoe.shared.errors import FedmoeError

    from fedmoe.server.commands.dashboard import operator_args

    armed_faults()  # FEDMOE_FAULT reaches the ServerApp: check it here, in one line
    ops = operator_args(args)  # the dashboard's flags: TLS off loopback, the token
    if args.resume and args.out and Path(args.resume).resolve() != Path(args.out).resolve():
        raise FedmoeError("--resume OUT and --out name different folders: give one")
    if not (args.resume or args.out):
        raise FedmoeError("coordinator start needs --out DIR (or --resume DIR)")
    if args.model and not Path(args.model).is_dir():
        raise FedmoeError(f"--model: folder not found: {args.model}")
    # the flags given, over the deployed defaults; the dataclasses check every value
    plan = apply_flags(FederationPlan(preset="deployed", model_dir=str(Path(args.model).resolve()) if args.model else ""), args)
    if plan.strategy.privacy == "dp":
        raise FedmoeError("--privacy dp runs in simulation only (fedmoe simulate); deployed, use ffa or secagg")
    if plan.strategy.round_timeout <= 0:
        raise FedmoeError(f"--round-timeout must be positive, got {plan.strategy.round_timeout}")
    run_config = to_flat(plan)
    for key in ("out", "preset", "resume"):  # set by run_coordinator / the stored config
        run_config.pop(key, None)
    sec = Security(insecure=args.insecure, ca_certfile=args.ssl_ca_certfile, certfile=args.ssl_certfile,
                   keyfile=args.ssl_keyfile, supernode_auth=args.enable_supernode_auth, site_keys=args.site_public_key)
    if args.resume:
        run_config, args.out = stored_run_config(args.resume), args.resume
    rounds = int(run_config.get("rounds", plan.rounds))
    echo = None if args.quiet or args.json else (lambda line: print(line, file=sys.stderr, flush=True))

    def on_sigterm(signum, frame):  # stop the run and the SuperLink as Ctrl-C does
        raise KeyboardInterrupt

    from fedmoe.server.commands.dashboard import start_from_args as start_operator_endpoints

    operator = start_operator_endpoints(args, args.out, out=lambda text: print(text, file=sys.stderr, flush=True), ops=ops)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        result = run_coordinator(args.out, args.host, args.port, sec, run_config, timeout=args.timeout, echo=echo)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if operator is not None:
            operator.stop()
    summary = {"run_id": result.run_id, "status": result.status, "rounds_committed": result.rounds_committed,
               "rounds": rounds, "experts": result.experts, "seconds": result.seconds, "out": result.out}
    ok = result.rounds_committed == rounds and "failed" not in result.status
    if args.json:
        print_json(summary)
    else:
        print(f"run {result.run_id}: {result.status}; {result.rounds_committed}/{rounds} rounds committed in "
              f"{result.seconds:.0f}s; experts: {', '.join(result.experts) or 'none'} -> {result.out}")
    return 0 if ok else 1
