"""`fedmoe bench quality`: every method of the report over several seeds, mean ± sd, and
the paired differences the README's claims rest on.

Per seed (the suite, the sampling and every initialisation follow `--seed`), one full
`fedmoe simulate --preset P --seed S` (federation, baselines, gates, static merges), plus
two federation-only variants on the same seed for the paired comparisons that need a
different federation: `--aggregation naive` and `--compression int8` (`--no-baselines
--no-moe --no-mia`; only their experts are compared). Each run is a fresh process.

Reported, per method: mean and sample sd over seeds of the mixed accuracy, the conflict
set's (when the suite has one), each domain's, and each gate's routing accuracy. Paired differences (per seed, then mean
± sd): `exact_vs_naive` and `int8_vs_fp32` (experts_oracle), `gate_vs_oracle` (the best
gate by mean), `experts_vs_local_only`, `experts_vs_centralized`, `gate_vs_best_static`
(the best merge on the mixed set) and `gate_vs_best_static_conflict` (the best merge on
the conflict set); with the variants also `exact_vs_naive_loss` and `int8_vs_fp32_loss`
(experts_oracle's mixed loss, lower is better). `targets` checks issue 15's thresholds on
those means. A difference whose
|mean| is within 2 sd (or with one seed) is marked `"resolved": false`: report it as no
measurable difference.

    fedmoe bench quality --preset smoke --seeds 3
    fedmoe bench quality --preset default --seeds 3 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"naive": ["--aggregation", "naive"], "int8": ["--compression", "int8"]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="smoke", help="simulate preset (default: smoke)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--no-variants", action="store_true",
                   help="skip the naive-aggregation and int8-wire runs (no exact_vs_naive / int8_vs_fp32)")
    p.add_argument("--keep-runs", help="folder to keep the run folders in (default: a temporary folder)")
    p.add_argument("--extra", default="", help="more `fedmoe simulate` flags for every run, e.g. \"--rounds 2\"")
    p.add_argument("--from-runs", default=None, metavar="DIR",
                   help="summarize the finished seed runs kept in DIR (a --keep-runs folder: seedN/report.json, "
                        "seedN-naive/, seedN-int8/) instead of running anything")


def simulate(out: Path, preset: str, seed: int, extra: list[str]) -> dict:
    from fedmoe.shared.errors import FedmoeError

    cmd = [sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--preset", preset, "--seed", str(seed),
           "--out", str(out), "--json", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-2:])[-400:]
        raise FedmoeError(f"bench quality: `{' '.join(cmd[3:])}` failed: {tail}")
    report = json.loads((out / "report.json").read_text())
    report["bench_seconds"] = time.perf_counter() - start
    return report


def mean_sd(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def paired(a: list[float], b: list[float]) -> dict:
    d = [x - y for x, y in zip(a, b)]
    out = mean_sd(d)
    out["resolved"] = len(d) > 1 and abs(out["mean"]) > 2 * out["sd"]
    return out


def summarize(seeds: list[int], reports: list[dict], variants: dict[str, list[dict]]) -> dict:
    methods: dict[str, dict] = {}
    names = [m for m in reports[0]["methods"] if all(m in r["methods"] for r in reports)]
    for name in names:
        rows = [r["methods"][name] for r in reports]
        entry = {"mixed": mean_sd([row["mixed"] for row in rows]),
                 "per_domain": {d: mean_sd([row["per_domain"][d] for row in rows]) for d in rows[0]["per_domain"]}}
        if all(isinstance(row.get("conflict"), (int, float)) for row in rows):
            entry["conflict"] = mean_sd([row["conflict"] for row in rows])
        if all(isinstance(row.get("routing_accuracy"), (int, float)) for row in rows):
            entry["routing"] = mean_sd([row["routing_accuracy"] for row in rows])
        methods[name] = entry

    def series(name: str, source=reports) -> list[float]:
        return [r["methods"][name]["mixed"] for r in source]

    pairs: dict[str, dict] = {}
    if "experts_oracle" in methods:
        oracle = series("experts_oracle")
        for other, label in (("local_only", "experts_vs_local_only"), ("centralized", "experts_vs_centralized")):
            if other in methods:
                pairs[label] = paired(oracle, series(other))
        gates = [m for m in methods if m.startswith("moe_")]
        if gates:
            best = max(gates, key=lambda m: methods[m]["mixed"]["mean"])
            pairs["gate_vs_oracle"] = paired(series(best), oracle) | {"gate": best}
            merges = [m for m in methods if m.startswith("static_")]
            if merges:
                merge = max(merges, key=lambda m: methods[m]["mixed"]["mean"])
                pairs["gate_vs_best_static"] = paired(series(best), series(merge)) | {"gate": best, "merge": merge}
                with_conflict = [m for m in merges if "conflict" in methods[m]]
                if "conflict" in methods[best] and with_conflict:  # against the merge best on the conflict set
                    merge = max(with_conflict, key=lambda m: methods[m]["conflict"]["mean"])
                    conflict = [[r["methods"][m]["conflict"] for r in reports] for m in (best, merge)]
                    pairs["gate_vs_best_static_conflict"] = paired(*conflict) | {"gate": best, "merge": merge}
        for variant, label in (("naive", "exact_vs_naive"), ("int8", "int8_vs_fp32")):
            runs = variants.get(variant)
            if runs:  # exact minus naive; int8 minus fp32
                sides = (reports, runs) if variant == "naive" else (runs, reports)
                pairs[label] = paired(*(series("experts_oracle", side) for side in sides))
                losses = [[r["methods"]["experts_oracle"].get("loss") for r in side] for side in sides]
                if all(isinstance(v, (int, float)) for side in losses for v in side):  # mixed loss, lower is better
                    pairs[f"{label}_loss"] = paired(*losses)
    metric = reports[0].get("metric", "exact_match")
    return {"benchmark": "quality", "preset": reports[0].get("preset"), "metric": metric, "seeds": seeds,
            "methods": methods, "paired": pairs, "targets": targets(methods, pairs),
            "seconds_per_seed": mean_sd([r["bench_seconds"] for r in reports]),
            "note": "mean ± sample sd over seeds; a paired difference with |mean| <= 2 sd is not resolved "
                    "(no measurable difference)"}


def targets(methods: dict, pairs: dict) -> list[dict]:
    """Issue 15's "done when", checked on the means over seeds: each target with what was
    measured and whether the mean meets it (`met`); `resolved` says whether the paired
    difference behind it is outside its noise. Reported, never used to choose anything."""
    out = []

    def add(name: str, measured: float, target: float, resolved: bool | None = None) -> None:
        out.append({"target": name, "measured": measured, "threshold": target, "met": measured >= target - 1e-9}
                   | ({} if resolved is None else {"resolved": resolved}))

    for label, name, threshold in (("experts_vs_local_only", "experts_oracle - local_only >= +5 points", 0.05),
                                   ("experts_vs_centralized", "experts_oracle - centralized >= -3 points", -0.03),
                                   ("gate_vs_best_static", "best gate - best static merge >= +5 points (mixed)", 0.05),
                                   ("gate_vs_best_static_conflict", "best gate - best static merge >= +5 points (conflict)", 0.05)):
        if label in pairs:
            add(name, pairs[label]["mean"], threshold, pairs[label]["resolved"])
    if "gate_vs_oracle" in pairs:
        gate, oracle = methods[pairs["gate_vs_oracle"]["gate"]], methods["experts_oracle"]
        for part in ("mixed", "conflict"):
            if part in gate and part in oracle and oracle[part]["mean"] > 0:
                add(f"best gate >= 99% of experts_oracle ({part})", gate[part]["mean"] / oracle[part]["mean"], 0.99)
        if "routing" in gate:
            add("best gate's routing accuracy >= 95%", gate["routing"]["mean"], 0.95)
    return out


def run(args) -> dict:
    from fedmoe.shared.errors import FedmoeError

    if args.seeds < 1:
        raise FedmoeError(f"--seeds must be >= 1, got {args.seeds}")
    if args.from_runs:
        return from_runs(Path(args.from_runs))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    extra = args.extra.split()
    reports, variants = [], {v: [] for v in ([] if args.no_variants else VARIANTS)}
    with tempfile.TemporaryDirectory(prefix="fedmoe-bench-quality-") as tmp:
        root = Path(args.keep_runs) if args.keep_runs else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            print(f"  seed {seed}: simulate --preset {args.preset} (all methods) ...", file=sys.stderr, flush=True)
            reports.append(simulate(root / f"seed{seed}", args.preset, seed, extra))
            for variant in variants:
                print(f"  seed {seed}: {' '.join(VARIANTS[variant])} (federation only) ...", file=sys.stderr, flush=True)
                flags = [*VARIANTS[variant], "--no-baselines", "--no-moe", "--no-mia", *extra]
                variants[variant].append(simulate(root / f"seed{seed}-{variant}", args.preset, seed, flags))
    return summarize(seeds, reports, variants)


def from_runs(root: Path) -> dict:
    """The summary of the seed runs already in `root` (`--keep-runs`): every seedN with a
    report.json, and its naive/int8 variants where all seeds have them."""
    from fedmoe.shared.errors import FedmoeError

    found = sorted((int(d.name[4:]), d) for d in root.glob("seed*") if d.name[4:].isdigit() and (d / "report.json").is_file())
    if not found:
        raise FedmoeError(f"--from-runs {root}: no seedN/report.json there")
    seeds = [s for s, _ in found]
    reports = [json.loads((d / "report.json").read_text()) | {"bench_seconds": None} for _, d in found]
    for r in reports:
        r["bench_seconds"] = r.get("wall_seconds") or 0.0
    variants = {}
    for v in VARIANTS:
        paths = [root / f"seed{s}-{v}" / "report.json" for s in seeds]
        if all(p.is_file() for p in paths):
            variants[v] = [json.loads(p.read_text()) for p in paths]
    return summarize(seeds, reports, variants)


def summary(result: dict) -> str:
    """A Markdown table (per-domain means; mixed, conflict and routing as mean ± sd), the
    paired differences and the targets: what the README's tables are copied from."""
    seeds, methods = result["seeds"], result["methods"]
    domains = sorted({d for m in methods.values() for d in m["per_domain"]})
    cell = lambda v: f"{v['mean']:.3f} ± {v['sd']:.3f}"  # noqa: E731
    lines = [f"{result['preset']} preset, seeds {', '.join(map(str, seeds))}, {result['metric']} (mean ± sd over seeds):", "",
             "| method | " + " | ".join(domains) + " | mixed | conflict | routing |",
             "|---|" + "---|" * (len(domains) + 3)]
    for name, m in methods.items():
        per = " | ".join(f"{m['per_domain'][d]['mean']:.3f}" if d in m["per_domain"] else "" for d in domains)
        lines.append(f"| {name} | {per} | **{cell(m['mixed'])}** | {cell(m['conflict']) if 'conflict' in m else ''} | "
                     f"{cell(m['routing']) if 'routing' in m else ''} |")
    lines += ["", "paired differences (points, mean ± sd over seeds; *_loss: mixed loss, nats):"]
    for name, p in result["paired"].items():
        verdict = "" if p["resolved"] else "  (no measurable difference)"
        which = f"  [{p['gate']} vs {p['merge']}]" if "merge" in p else (f"  [{p['gate']}]" if "gate" in p else "")
        value = f"{p['mean']:+7.3f} ± {p['sd']:.3f}" if name.endswith("_loss") else f"{100 * p['mean']:+7.1f} ± {100 * p['sd']:.1f}"
        lines.append(f"  {name:<30}{value}{verdict}{which}")
    if result.get("targets"):
        lines += ["", "targets (on the means):"]
        for t in result["targets"]:
            noise = "" if t.get("resolved", True) else ", inside the noise"
            value = f"{100 * t['measured']:+.2f} points" if "points" in t["target"] else f"{100 * t['measured']:.1f}%"
            lines.append(f"  {'met   ' if t['met'] else 'MISSED'} {t['target']}: {value}{noise}")
    return "\n".join(lines)


def plot(result: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["methods"])
    parts = ["mixed"] + (["conflict"] if any("conflict" in m for m in result["methods"].values()) else [])
    width = 0.8 / len(parts)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 4))
    for i, (part, color) in enumerate(zip(parts, ("#4C72B0", "#DD8452"))):
        entries = [result["methods"][n].get(part, {"mean": 0.0, "sd": 0.0}) for n in names]
        ax.bar([j + (i - (len(parts) - 1) / 2) * width for j in range(len(names))], [e["mean"] for e in entries],
               width, yerr=[e["sd"] for e in entries], capsize=2, color=color, label=part)
    ax.set_xticks(range(len(names)), names)
    ax.legend(fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"{result['metric']} (mean ± sd, {len(result['seeds'])} seeds)")
    ax.set_title(f"fedmoe bench quality --preset {result['preset']}, seeds {', '.join(map(str, result['seeds']))}", fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
