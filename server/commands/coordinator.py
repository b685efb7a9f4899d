"""`fedmoe coordinator start`: a SuperLink and our ServerApp run, until the run ends."""

from __future__ import annotations

import signal
import sys

from fedmoe.shared.cli import add_json_flag, add_schedule_flags, add_short_round_flags, check_short_round_flags, print_json


def register(sub) -> None:
    coord = sub.add_parser("coordinator", help="run the coordinator: a Flower SuperLink and the fedmoe ServerApp")
    csub = coord.add_subparsers(dest="coordinator_command", metavar="ACTION", required=True)
    p = csub.add_parser("start", help="start a SuperLink, run the federation to its end, then stop",
                        description="Start a Flower SuperLink, submit the fedmoe app with `flwr run`, stream its log "
                                    "until the run ends, and stop the SuperLink. Sites join with `fedmoe site start`.")
    p.add_argument("--host", default="127.0.0.1", help="address the SuperLink listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9093, help="SuperLink port: fleet, control and runtime APIs (default 9093)")
    p.add_argument("--out", help="run folder to write (run.db, experts/, logs, flwr/)")
    p.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its newest verified round, with the run "
                                                   "config it started with (the run-config flags are ignored)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    p.add_argument("--expected-sites", type=int, default=1, help="sites to wait for before the first round (default 1)")
    p.add_argument("--node-wait", type=float, default=120.0, help="seconds to wait for the expected sites (default 120)")
    p.add_argument("--local-steps", type=int, default=30, help="optimizer steps per site per round (default 30)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aggregation", default="exact", choices=["exact", "naive"], help="exact (default) or naive FedIT")
    p.add_argument("--round-timeout", type=float, default=900.0,
                   help="seconds a round waits for its sites; late or dead sites are counted as failed (default 900)")
    p.add_argument("--prox-mu", type=float, default=0.0, help="FedProx: proximal term weight on the sites (default 0: off)")
    p.add_argument("--server-opt", default="none", choices=["none", "fedadam"], help="server-side optimizer on each expert")
    p.add_argument("--server-lr", type=float, default=3e-3, help="fedadam: server step size (default 3e-3)")
    p.add_argument("--server-tau", type=float, default=1e-3, help="fedadam: adaptivity tau (default 1e-3)")
    add_schedule_flags(p)
    add_short_round_flags(p)
    p.add_argument("--model", help="base model directory (default: the built-in tiny model)")
    p.add_argument("--privacy", default="none", choices=["none", "ffa", "secagg"],
                   help="ffa: frozen shared A (FFA-LoRA); secagg: ffa + site clipping, per-domain sums through "
                        "Flower's SecAgg+ (needs 2+ sites per domain) (default none)")
    p.add_argument("--clip", type=float, help="secagg: site update norm bound C (default 100)")
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

    add_operator_flags(p, embedded=True)  # --http-port (dashboard), --operator-port, --dashboard-host, --dashboard-token
    add_json_flag(p)
    p.set_defaults(func=cmd_coordinator_start)


def cmd_coordinator_start(args) -> int:
    from pathlib import Path

    from fedmoe.server.federation.coordinator import Security, run_coordinator, stored_run_config
    from fedmoe.server.federation.faults import armed_faults
    from fedmoe.shared.errors import FedmoeError

    armed_faults()  # FEDMOE_FAULT reaches the ServerApp: check it here, in one line
    check_short_round_flags(args)
    if args.resume and args.out and Path(args.resume).resolve() != Path(args.out).resolve():
        raise FedmoeError("--resume OUT and --out name different folders: give one")
    if not (args.resume or args.out):
        raise FedmoeError("coordinator start needs --out DIR (or --resume DIR)")

    for flag, value, low in (("--rounds", args.rounds, 1), ("--expected-sites", args.expected_sites, 1),
                             ("--local-steps", args.local_steps, 1), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise FedmoeError(f"{flag} must be >= {low}, got {value}")
    if args.round_timeout <= 0:
        raise FedmoeError(f"--round-timeout must be positive, got {args.round_timeout}")
    from fedmoe.server.federation.privacy import default_clip

    args.clip = default_clip(args.privacy, args.clip)
    if not args.clip > 0:
        raise FedmoeError(f"--clip must be > 0, got {args.clip}")
    if args.model and not Path(args.model).is_dir():
        raise FedmoeError(f"--model: folder not found: {args.model}")
    sec = Security(insecure=args.insecure, ca_certfile=args.ssl_ca_certfile, certfile=args.ssl_certfile,
                   keyfile=args.ssl_keyfile, supernode_auth=args.enable_supernode_auth, site_keys=args.site_public_key)
    run_config = {"rounds": args.rounds, "expected-sites": args.expected_sites, "node-wait": args.node_wait,
                  "local-steps": args.local_steps, "batch-size": args.batch_size, "lr": args.lr, "seed": args.seed,
                  "aggregation": args.aggregation, "round-timeout": args.round_timeout, "prox-mu": args.prox_mu,
                  "server-opt": args.server_opt, "server-lr": args.server_lr, "server-tau": args.server_tau,
                  "model-path": str(Path(args.model).resolve()) if args.model else "", "min-replies": args.min_replies,
                  "short-round": args.short_round, "max-retries": args.max_retries,
                  "privacy": args.privacy, "clip": args.clip, "lr-schedule": args.lr_schedule, "eval-every": args.eval_every}
    if args.resume:
        run_config, args.out = stored_run_config(args.resume), args.resume
        args.rounds = int(run_config.get("rounds", args.rounds))
    echo = None if args.quiet or args.json else (lambda line: print(line, file=sys.stderr, flush=True))

    def on_sigterm(signum, frame):  # stop the run and the SuperLink as Ctrl-C does
        raise KeyboardInterrupt

    from fedmoe.server.commands.dashboard import start_from_args as start_operator_endpoints

    operator = start_operator_endpoints(args, args.out, out=lambda text: print(text, file=sys.stderr, flush=True))
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        result = run_coordinator(args.out, args.host, args.port, sec, run_config, timeout=args.timeout, echo=echo)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if operator is not None:
            operator.stop()
    summary = {"run_id": result.run_id, "status": result.status, "rounds_committed": result.rounds_committed,
               "rounds": args.rounds, "experts": result.experts, "seconds": result.seconds, "out": result.out}
    ok = result.rounds_committed == args.rounds and "failed" not in result.status
    if args.json:
        print_json(summary)
    else:
        print(f"run {result.run_id}: {result.status}; {result.rounds_committed}/{args.rounds} rounds committed in "
              f"{result.seconds:.0f}s; experts: {', '.join(result.experts) or 'none'} -> {result.out}")
    return 0 if ok else 1
