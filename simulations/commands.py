"""`fedmoe data make-suite` (and, as they land, `simulate` and `bench`)."""

from __future__ import annotations

from fedmoe.shared.cli import add_json_flag, print_json


def register(sub) -> None:
    data = sub.add_parser("data", help="generate domain data")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser("make-suite", help="write a multi-domain suite of site folders and mixed-eval.jsonl")
    p.add_argument("--out", required=True, help="suite folder to write")
    p.add_argument("--domains", type=int, default=4, help="number of domains (default 4: medicine, law, finance, telecom)")
    p.add_argument("--sites", type=int, default=8, help="number of sites (default 8)")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p)
    p.set_defaults(func=cmd_make_suite)


def cmd_make_suite(args) -> int:
    from fedmoe.simulations.domain_suite import make_suite

    summary = make_suite(args.out, args.domains, args.sites, args.seed)
    if args.json:
        print_json(summary)
        return 0
    print(f"{'site':<10}{'domain':<12}{'train':>7}{'eval':>6}")
    for s in summary["sites"]:
        print(f"{s['site']:<10}{s['domain']:<12}{s['train']:>7}{s['eval']:>6}")
    print(f"mixed-eval.jsonl: {summary['mixed_eval']} records across {', '.join(summary['domains'])} -> {args.out}")
    return 0
