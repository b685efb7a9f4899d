"""`fedmoe site start`: a site = the site daemon (this process) + a Flower SuperNode.

This process loads the site's data and base model once, serves the site daemon on a
private Unix socket, then starts `flower-supernode` whose ClientApp forwards every
message to the daemon. It supervises the SuperNode: Ctrl-C or SIGTERM stops both, and
if the SuperNode dies the daemon stops too (exit status 1).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.network import free_port
from fedmoe.shared.processes import popen_bound_to_parent, stop_group


def log(text: str) -> None:
    print(f"fedmoe site: {text}", file=sys.stderr, flush=True)


def register(sub) -> None:
    site = sub.add_parser("site", help="run a site: the site daemon beside a Flower SuperNode")
    ssub = site.add_subparsers(dest="site_command", metavar="ACTION", required=True)
    p = ssub.add_parser("start", help="join a federation: load the model, start the daemon and a SuperNode",
                        description=__doc__.split("\n\n")[1])
    p.add_argument("--superlink", required=True, help="the coordinator's SuperLink, HOST:PORT")
    p.add_argument("--data", required=True, help="site folder with train.jsonl, eval.jsonl, site.toml")
    p.add_argument("--domain", help="domain tag (default: the one in site.toml; must agree with it)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank this site trains (default 8)")
    p.add_argument("--quant", default="nf4", help="base model quantization: nf4 (default) | int8 | none")
    p.add_argument("--model", help="base model directory (default: the built-in tiny model)")
    p.add_argument("--insecure", action="store_true",
                   help="connect without TLS (only to a loopback SuperLink, for testing)")
    p.add_argument("--root-certificates", help="CA certificate (PEM) that signed the SuperLink's TLS certificate")
    p.add_argument("--auth-supernode-private-key", help="this site's private key, when the SuperLink authenticates sites")
    p.add_argument("--node-port", type=int, default=0,
                   help="local port of the SuperNode's runtime API (default: a free port on 127.0.0.1)")
    p.add_argument("--daemon-address",
                   help="where the daemon listens: unix:PATH or 127.0.0.1:PORT (default: a private Unix socket)")
    p.add_argument("--work-dir", help="folder for the audit log and Flower's files (default: under ~/.cache/fedmoe/sites/)")
    p.add_argument("--threads", type=int, help="CPU threads for training (default: torch's default, all cores)")
    p.add_argument("--min-privacy", metavar="MODES",
                   help="privacy modes this site trains under: none | ffa | dp | secagg, or several (dp,secagg); "
                        "a TRAIN in a weaker mode is refused with the reason, no update sent (default: none = any; "
                        "site.toml's min_privacy, if set, also applies)")
    p.add_argument("--min-noise-multiplier", type=float,
                   help="under dp: refuse a run whose declared noise multiplier is below this")
    p.add_argument("--max-clip", type=float, help="under dp / secagg: refuse a run whose update clip is above this")
    p.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts (default: retry forever)")
    p.add_argument("--poll-interval", type=float, default=1.0,
                   help="seconds between the SuperNode's polls for a message, 0.05-3 (Flower's own is a fixed 3; "
                        "default 1: a round starts sooner; lower it for a few sites, raise it for thousands)")
    p.add_argument("--trust-fab-hash", action="append", metavar="SHA256",
                   help="run only app bundles with this sha256 (repeatable or comma-separated; the coordinator logs its "
                        "bundle's); without it any bundle of fedmoe's own app, equal to this site's installed copy, runs")
    p.set_defaults(func=cmd_site_start)


def check_transport(superlink: str, insecure: bool, root_certificates: str | None, what: str = "SuperLink") -> None:
    from fedmoe.shared.network import is_loopback_host, split_host_port

    host, _ = split_host_port(superlink, "--superlink")
    if insecure:
        if root_certificates:
            raise FedmoeError("--insecure and --root-certificates exclude each other")
        if not is_loopback_host(host):
            raise FedmoeError(f"--insecure is allowed only with a loopback {what} (127.0.0.1, ::1, localhost), not {host!r}; "
                              "use --root-certificates")
        log("warning: --insecure: traffic to the SuperLink is not encrypted (loopback only)")
    elif not root_certificates:
        raise FedmoeError("give --root-certificates CA.pem to connect over TLS (or --insecure on loopback, for testing)")
    elif not Path(root_certificates).is_file():
        raise FedmoeError(f"--root-certificates: file not found: {root_certificates}")


def default_work_dir(data: Path) -> Path:
    import hashlib

    from fedmoe.shared.pretrain import cache_dir

    tag = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:8]
    return cache_dir() / "sites" / f"{data.resolve().name}-{tag}"


def cmd_site_start(args) -> int:
    from fedmoe.client import daemon
    from fedmoe.client.site import SiteSettings
    from fedmoe.shared.data import load_site
    from fedmoe.shared.modeling import QUANT_MODES

    check_transport(args.superlink, args.insecure, args.root_certificates)
    if args.quant not in QUANT_MODES:
        raise FedmoeError(f"unknown quantization {args.quant!r}: choose one of {', '.join(QUANT_MODES)}")
    if args.rank < 1:
        raise FedmoeError(f"--rank must be >= 1, got {args.rank}")
    if not 0.05 <= args.poll_interval <= 3.0:
        raise FedmoeError(f"--poll-interval must be between 0.05 and 3 seconds, got {args.poll_interval}")
    if args.threads is not None and args.threads < 1:
        raise FedmoeError(f"--threads must be >= 1, got {args.threads}")
    if args.auth_supernode_private_key and not Path(args.auth_supernode_private_key).is_file():
        raise FedmoeError(f"--auth-supernode-private-key: file not found: {args.auth_supernode_private_key}")
    from fedmoe.client.bundle_check import parse_hashes

    pinned = parse_hashes(args.trust_fab_hash)
    import importlib.util

    if importlib.util.find_spec("flwr.supernode") is None:
        raise FedmoeError("Flower's SuperNode (flwr.supernode) is not installed: pip install flwr")
    data = Path(args.data).resolve()
    site = load_site(data, args.domain)
    settings = SiteSettings(str(data), site.domain, args.rank, args.quant, str(Path(args.model).resolve()) if args.model else None,
                            args.min_privacy, args.min_noise_multiplier, args.max_clip)
    from fedmoe.client.site import policy

    site_policy = policy(settings)  # a malformed policy (flag or site.toml) stops here, in one line
    work = Path(args.work_dir).resolve() if args.work_dir else default_work_dir(data)
    work.mkdir(parents=True, exist_ok=True)
    socket_dir = None
    address = args.daemon_address
    if not address:
        socket_dir = tempfile.mkdtemp(prefix="fedmoe-site-")  # 0700; short path (sun_path is ~107 bytes)
        address = f"unix:{socket_dir}/daemon.sock"
    audit = work / "audit.jsonl"

    # Signals: stop cleanly from here on (model loading included).
    stopping = {"signal": None}

    def on_signal(signum, frame):
        stopping["signal"] = signum
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    server = supernode = None
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        log(f"loading {site.domain} site {data.name} ({args.quant}, rank {args.rank}) ...")
        log(f"privacy policy: {site_policy.text()}")
        server, address = daemon.serve(settings, address, audit, log=log)
        log(f"site daemon listening on {address}; audit log: {audit}")
        node_config = f"daemon-address='{address}' domain='{site.domain}' rank={args.rank} quant='{args.quant}'"
        cmd = [sys.executable, "-m", "fedmoe.client.supernode", "--superlink", args.superlink, "--node-config", node_config,
               "--host", "127.0.0.1", "--port", str(args.node_port or free_port())]
        cmd += ["--insecure"] if args.insecure else ["--root-certificates", str(Path(args.root_certificates).resolve())]
        if args.auth_supernode_private_key:
            cmd += ["--auth-supernode-private-key", str(Path(args.auth_supernode_private_key).resolve())]
        if args.max_retries is not None:
            cmd += ["--max-retries", str(args.max_retries)]
        env = dict(os.environ, FLWR_HOME=str(work / "flwr"), FEDMOE_SUPERNODE_POLL_S=str(args.poll_interval))
        if pinned:
            env["FEDMOE_TRUST_FAB_HASH"] = ",".join(sorted(pinned))
            log(f"running only app bundles with sha256 {', '.join(sorted(pinned))}")
        # The SuperNode's SuperExec polls for a message to run every 1 s by default; a poll is
        # one local HTTP call, so polling faster costs little and starts each round sooner.
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
        supernode = popen_bound_to_parent(cmd, env=env, start_new_session=True)
        log(f"SuperNode (pid {supernode.pid}) connecting to {args.superlink}")
        code = supernode.wait()
        log(f"SuperNode exited with status {code}; stopping the site daemon")
        return 1
    except KeyboardInterrupt:
        log(f"stopping ({signal.Signals(stopping['signal']).name if stopping['signal'] else 'interrupted'})")
        return 0 if stopping["signal"] == signal.SIGTERM else 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if supernode is not None:
            stop_group(supernode, grace=5)
        if server is not None:
            server.stop(grace=2).wait(5)
        if socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
