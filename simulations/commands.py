"""`fedmoe data make-suite` (and, as they land, `simulate` and `bench`)."""

from __future__ import annotations

from fedmoe.shared.cli import add_json_flag, print_json


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
    p.add_argument("--size-skew", type=float, default=0.0, metavar="SIGMA",
                   help="synthetic: lognormal spread of examples per site (sigma, mean 1; 0 = the four fixed sizes; "
                        "1 = a few large sites and many small ones)")
    p.add_argument("--terms-per-domain", type=int, default=120, help="wordnet, foldoc: terms per domain (default 120)")
    p.add_argument("--seed", type=int, default=0)
    add_json_flag(p)
    p.set_defaults(func=cmd_make_suite)

    s = sub.add_parser("simulate", help="run a whole federation on this machine (Flower Simulation Engine)")
    from fedmoe.shared.config import add_flags
    from fedmoe.simulations.simulate import PRESET_FIELDS, SimulationRun

    s.add_argument("--out", help="run folder to write (run.db, experts/, report.*)")
    s.add_argument("--resume", metavar="OUT", help="continue a killed run in OUT from its last committed round")
    # every option of the run: one flag per field of SimulationRun (its options and StrategyConfig)
    add_flags(s, SimulationRun, shown={f.replace("_", "-"): "the preset's" for f in PRESET_FIELDS}
              | {"quant": "the preset's", "round-timeout": "600 in simulation"})
    add_json_flag(s)
    s.set_defaults(func=cmd_simulate)
    register_bench(sub)


DEFINITION_DOMAINS = {"wordnet": "law,medicine,computing,finance", "foldoc": "computing,networking,telecom"}


def cmd_make_suite(args) -> int:
    from fedmoe.shared.errors import FedmoeError

    if args.source == "synthetic":
        from fedmoe.simulations.domain_suite import make_suite

        domains = args.domains or "4"
        summary = make_suite(args.out, int(domains) if domains.isdigit() else domains.split(","), args.sites, args.seed,
                             size_skew=args.size_skew)
    else:
        if args.size_skew:
            raise FedmoeError(f"--size-skew applies to the synthetic suite, not --source {args.source}")
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
    from fedmoe.shared.config import apply_flags, given_flags
    from fedmoe.shared.errors import FedmoeError
    from fedmoe.simulations.simulate import preset_run, report_table, resume_run, simulate

    armed_faults()  # FEDMOE_FAULT (crash tests): a typo is a one-line error before anything starts
    if args.resume:
        if given_flags(args):
            raise FedmoeError(f"--resume runs with the options it started with; drop --{sorted(given_flags(args))[0].split('.')[-1].replace('_', '-')}")
        report = simulate(resume_run(args.resume), args.resume, resume=True)
        args.out = args.resume
    elif not args.out:
        raise FedmoeError("simulate needs --out DIR (or --resume DIR)")
    else:
        preset = getattr(args, "cfg__preset", "smoke")
        report = simulate(apply_flags(preset_run(preset), args), args.out)
    if args.json:
        print_json(report)
    else:
        print(report_table(report))
        from fedmoe.simulations.privacy_report import markdown

        print(markdown(report).strip())
        print(f"wall {report['wall_seconds']:.0f}s; report: {args.out}/report.md")
    return 0


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
    "quality": ("fedmoe.simulations.benchmarks.quality", "every method over several seeds: mean ± sd and paired differences"),
    "serve": ("fedmoe.simulations.benchmarks.serve", "the OpenAI-compatible API under 1/4/16 clients: tokens/s, p50/p95, gated vs one expert"),
    "resume": ("fedmoe.simulations.benchmarks.resume", "a simulation SIGKILLed K times and resumed vs one never killed: same numbers?"),
    "scale": ("fedmoe.simulations.benchmarks.scale", "a federation of 10 / 100 / 1,000 sites: seconds a round, peak RSS, run store size"),
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
