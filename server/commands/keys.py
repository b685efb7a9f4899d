"""`fedmoe keys`: the key material of an authenticated federation."""

from __future__ import annotations

from fedmoe.shared.cli import add_json_flag, print_json


def register(sub) -> None:
    keys = sub.add_parser("keys", help="TLS CA + coordinator certificate, site key pairs, site registration")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = ksub.add_parser("init", help="create the federation's CA and the coordinator's TLS certificate")
    p.add_argument("--out", required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    p.add_argument("--host", action="append", default=[], help="a name or IP the coordinator is reached at (repeatable)")
    p.add_argument("--days", type=int, default=365)
    add_json_flag(p)
    p.set_defaults(func=cmd_init)
    p = ksub.add_parser("site", help="create a site's OpenSSH ECDSA P-384 key pair (OUT/sites/NAME[.pub])")
    p.add_argument("name")
    p.add_argument("--out", required=True, help="the federation's key folder")
    add_json_flag(p)
    p.set_defaults(func=cmd_site)
    p = ksub.add_parser("register", help="register a site's public key with a running SuperLink")
    p.add_argument("public_key", metavar="KEY.pub")
    p.add_argument("--flwr-home", required=True, help="FLWR_HOME with the SuperLink connection (the coordinator's OUT/flwr)")
    p.add_argument("--connection", default="fedmoe", help="connection name in FLWR_HOME/config.toml (default fedmoe)")
    add_json_flag(p)
    p.set_defaults(func=cmd_register)


def cmd_init(args) -> int:
    from fedmoe.server.ops.keys import make_ca_and_server_cert

    files = make_ca_and_server_cert(args.out, args.host or ["127.0.0.1", "localhost"], args.days)
    print_json(files) if args.json else print("\n".join(f"{k}: {v}" for k, v in files.items()))
    return 0


def cmd_site(args) -> int:
    from fedmoe.server.ops.keys import make_site_keys

    files = make_site_keys(args.out, args.name)
    print_json(files) if args.json else print("\n".join(f"{k}: {v}" for k, v in files.items()))
    return 0


def cmd_register(args) -> int:
    from fedmoe.server.ops.keys import register_site

    text = register_site(args.public_key, args.flwr_home, args.connection)
    print_json({"registered": args.public_key, "output": text}) if args.json else print(text or f"registered {args.public_key}")
    return 0
