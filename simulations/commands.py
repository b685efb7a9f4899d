"""`fedmoe data make-suite` (and, as they land, `simulate` and `bench`)."""

from __future__ import annotations

from fedmoe.shared.cli import add_json_flag, add_schedule_flags, add_short_round_flags, check_short_round_flags, print_json


def register(sub) -> None:
    data = sub.add_parser("data", help="generate domain data")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser("make-suite", help="write a multi-domain suite of site folders and mixed-eval.jsonl")
    p.add_argument("--out", required=True, help="suite folder to write")
    p.add_argument("--source", default="synthetic", choices=["synthetic", "wordnet", "foldoc"],
                   help="synthetic (default): made-up facts; wordnet / foldoc: real definitions from the Debian "
                        "packages wordnet-base / dict-foldoc, scored as multiple choice")
    p.add_argument("--domains", help="synthetic: a number (default 4: medicine, law, finance, telecom); "
                                     "wordnet (default law,medicine,computing,finance) and foldoc (default "
                                     "computing,networking,telecom): comma-separated names")
    p.add_argument("--sites", type=int, default=8, help="synthetic: number of sites (default 8)")
    p.add_argument("--sites-per-domain", type=int, default=2, help="wordnet, foldoc: sites per domain (default 2)")
    p.add_argument("--terms-per-domain", type=int, default=120, help="wordnet, foldoc: terms per domain (default 120)")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p)
    p.set_defaults(func=cmd_make_suite)

    s = sub.add_parser("simulate", help="run a whole federation on this machine (Flower Simulation Engine)")
    from fedmoe.simulations.presets import PRESETS

    s.add_argument("--preset", default="smoke", choices=list(PRESETS), help="scenario size (default: smoke)")
    s.add_argument("--model", help="base model: a folder, or smollm2-135m (fetched on first use) (default: the preset's, "
                                   "else the tiny model)")
    s.add_argument("--local-steps", type=int, help="local training steps per site per round (default: the preset's)")
    s.add_argument("--lr", type=float, help="local learning rate (default: the preset's)")
    s.add_argument("--batch-size", type=int, help="local batch size (default: the preset's)")
    s.add_argument("--ranks", type=parse_ranks, help="LoRA ranks cycled over the sites, e.g. 4,8,16 (default: the preset's)")
    s.add_argument("--quant", choices=["nf4", "int8", "none"], help="the sites' base model (default: the preset's)")
    s.add_argument("--sites-per-domain", type=int, help="sites per domain (default: the preset's)")
    s.add_argument("--fraction", type=float, help="share of each domain's sites sampled per round (default: the preset's)")
    s.add_argument("--seed", type=int, help="seed of the suite, sampling and initialisation (default: the preset's)")
    s.add_argument("--data-dir", help="suite folder of site folders + mixed-eval.jsonl (default: generated)")
    s.add_argument("--rounds", type=int, help="federated rounds (default: the preset's)")
    s.add_argument("--aggregation", default="exact", choices=["exact", "naive"], help="exact (default) or naive FedIT")
    s.add_argument("--compression", default="none", choices=["none", "fp16", "int8"],
                   help="adapter codec on the wire, both ways (default none = fp32)")
    s.add_argument("--out", help="run folder to write (run.db, experts/, report.*)")
    s.add_argument("--resume", metavar="OUT", help="continue a killed run in OUT from its last committed round")
    s.add_argument("--ray-address", help="run on an existing Ray cluster at this address")
    s.add_argument("--no-baselines", action="store_true", help="skip local_only, fedavg_single and centralized")
    s.add_argument("--no-moe", action="store_true", help="skip the MoE gates and static merges (moe_*, static_*)")
    s.add_argument("--robust", default="none", choices=["none", "norm", "trimmed-mean", "median"],
                   help="robust aggregation: norm = outlier rejection + norm bounding (exact); trimmed-mean/median "
                        "= coordinate-wise on factors (default none)")
    s.add_argument("--chaos", metavar="SPEC", help='faulty sites, e.g. "nan=0.1,shape=0.05,scale=0.1,dropout=0.2"')
    s.add_argument("--privacy", default="none", choices=["none", "ffa", "dp", "secagg"],
                   help="ffa: frozen shared A (FFA-LoRA); dp: ffa + site clipping + Gaussian noise + RDP accounting; "
                        "secagg: ffa + site clipping, per-domain sums through Flower's SecAgg+")
    s.add_argument("--noise-multiplier", type=float, default=1.0, help="dp: noise std / clip (default 1.0)")
    s.add_argument("--clip", type=float, help="dp, secagg: site update norm bound C (default: dp 1.0, secagg 100)")
    s.add_argument("--epsilon-budget", type=float, help="dp: stop before a round that would exceed this epsilon")
    s.add_argument("--dp-delta", type=float, default=1e-5, help="dp: delta of the reported (epsilon, delta) (default 1e-5)")
    s.add_argument("--no-mia", action="store_true", help="skip the membership-inference check in the report")
    s.add_argument("--prox-mu", type=float, default=0.0, help="FedProx: proximal term weight on the sites (default 0: off)")
    s.add_argument("--server-opt", default="none", choices=["none", "fedadam"],
                   help="server-side optimizer on each expert's aggregate (default none: the aggregate is the expert)")
    s.add_argument("--server-lr", type=float, default=3e-3, help="fedadam: server step size (default 3e-3)")
    s.add_argument("--server-tau", type=float, default=1e-3, help="fedadam: adaptivity tau (Adam's eps, default 1e-3)")
    add_schedule_flags(s)
    add_short_round_flags(s)
    add_json_flag(s)
    s.set_defaults(func=cmd_simulate)
    register_bench(sub)


DEFINITION_DOMAINS = {"wordnet": "law,medicine,computing,finance", "foldoc": "computing,networking,telecom"}


def cmd_make_suite(args) -> int:
    from fedmoe.shared.errors import FedmoeError

    if args.source == "synthetic":
        from fedmoe.simulations.domain_suite import make_suite

        domains = args.domains or "4"
        summary = make_suite(args.out, int(domains) if domains.isdigit() else domains.split(","), args.sites, args.seed)
    else:
        from fedmoe.simulations.foldoc_suite import make_foldoc_suite
        from fedmoe.simulations.wordnet_suite import make_wordnet_suite

        domains = [d.strip() for d in (args.domains or DEFINITION_DOMAINS[args.source]).split(",") if d.strip()]
        if len(set(domains)) != len(domains) or not domains:
            raise FedmoeError(f"--domains needs distinct comma-separated names, got {args.domains!r}")
        make = make_wordnet_suite if args.source == "wordnet" else make_foldoc_suite
        summary = make(args.out, domains, args.sites_per_domain, args.seed, terms_per_domain=args.terms_per_domain)
    if args.json:
        print_json(summary)
        return 0
    print(f"{'site':<10}{'domain':<12}{'train':>7}{'eval':>6}")
    for s in summary["sites"]:
        print(f"{s['site']:<10}{s['domain']:<12}{s['train']:>7}{s['eval']:>6}")
    print(f"mixed-eval.jsonl: {summary['mixed_eval']} records across {', '.join(summary['domains'])} -> {args.out}")
    if "conflict_eval" in summary:
        print(f"conflict-eval.jsonl: {summary['conflict_eval']} records ({len(summary['conflict_terms'])} terms "
              f"defined in several domains); built in {summary['seconds']:.1f}s")
    return 0


def cmd_simulate(args) -> int:
    from fedmoe.server.federation.faults import armed_faults
    from fedmoe.server.federation.privacy import default_clip
    from fedmoe.shared.errors import FedmoeError
    from fedmoe.simulations.simulate import report_table, resume_args, simulate

    armed_faults()  # FEDMOE_FAULT (crash tests): a typo is a one-line error before anything starts
    check_short_round_flags(args)
    if args.resume:
        report = simulate(out=args.resume, resume=True, **resume_args(args.resume))
        args.out = args.resume
    elif not args.out:
        raise FedmoeError("simulate needs --out DIR (or --resume DIR)")
    else:
        report = simulate(args.preset, args.out, args.data_dir, args.rounds, args.aggregation, args.ray_address,
                          baselines=not args.no_baselines, moe=not args.no_moe, compression=args.compression, robust=args.robust,
                          chaos=args.chaos, privacy=args.privacy, noise_multiplier=args.noise_multiplier,
                          clip=default_clip(args.privacy, args.clip),
                          epsilon_budget=args.epsilon_budget, dp_delta=args.dp_delta, mia=not args.no_mia,
                          prox_mu=args.prox_mu, server_opt=args.server_opt, server_lr=args.server_lr,
                          server_tau=args.server_tau, min_replies=args.min_replies, short_round=args.short_round,
                          max_retries=args.max_retries, overrides=preset_overrides(args),
                          lr_schedule=args.lr_schedule, eval_every=args.eval_every)
    if args.json:
        print_json(report)
    else:
        print(report_table(report))
        from fedmoe.simulations.privacy_report import markdown

        print(markdown(report).strip())
        print(f"wall {report['wall_seconds']:.0f}s; report: {args.out}/report.md")
    return 0


def parse_ranks(text: str) -> tuple[int, ...]:
    import argparse

    try:
        return tuple(int(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,8,16, got {text!r}") from None


def preset_overrides(args) -> dict:
    from fedmoe.simulations.presets import OVERRIDES

    return {name: getattr(args, name) for name in OVERRIDES if getattr(args, name, None) is not None}


# `fedmoe bench NAME`: one module per benchmark in fedmoe.simulations.benchmarks, one line here.
BENCHMARKS = {
    "memory": ("fedmoe.simulations.benchmarks.memory", "peak memory and tokens/s of LoRA training, nf4 vs none"),
    "latency": ("fedmoe.simulations.benchmarks.latency", "per-request latency of gated top-1 inference vs a single LoRA"),
    "edge": ("fedmoe.simulations.benchmarks.edge", "tokens/s, first-token latency and size: onnxruntime fp32/int8 vs torch eager"),
    "deployment": ("fedmoe.simulations.benchmarks.deployment", "per-round overhead: deployed (SuperLink, SuperNodes, site daemons) vs simulation"),
    "comm": ("fedmoe.simulations.benchmarks.comm", "adapter bytes per site per round and accuracy: fp32 vs fp16 vs int8 deltas"),
    "aggregate": ("fedmoe.simulations.benchmarks.aggregate", "exact (streaming, QR) vs naive aggregation of N sites: time, peak memory"),
    "overhead": ("fedmoe.simulations.benchmarks.overhead", "fedmoe simulate wall time vs the sites' pure local training time"),
    "step-time": ("fedmoe.simulations.benchmarks.step_time", "seconds per local LoRA training step on a real model: nf4 vs none"),
    "resume": ("fedmoe.simulations.benchmarks.resume", "a simulation SIGKILLed K times and resumed vs one never killed: same numbers?"),
}


def register_bench(sub) -> None:
    import importlib

    bench = sub.add_parser("bench", help="benchmarks (JSON + PNG, ratios measured side by side)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        p = bsub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.add_argument("--out", help="folder for the JSON result and plot (default: bench-results/)")
        add_json_flag(p)
        p.set_defaults(func=lambda args, m=module, n=name: run_bench(n, m, args))


def run_bench(name: str, module, args) -> int:
    import json
    from pathlib import Path

    result = module.run(args)
    out = Path(args.out or "bench-results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    if hasattr(module, "plot"):
        module.plot(result, out / f"{name}.png")
    if args.json:
        print_json(result)
    else:
        print(module.summary(result) if hasattr(module, "summary") else json.dumps(result, indent=2, default=str))
        print(f"wrote {out / (name + '.json')}")
    return 0
