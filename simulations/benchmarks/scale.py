"""`fedmoe bench scale`: a simulated federation of N sites, N = 10, 100, 1,000 by default.

For each N: the smoke preset's tiny model on a generated suite of N sites (2 domains,
lognormal site sizes, `--size-skew`), `--rounds` rounds of `--local-steps` steps at
`--fraction` of each domain's sites, in a fresh process (the coordinator: the ServerApp
and Flower's Simulation Engine), while a thread here samples the resident memory of that
process and of every Ray process it starts (psutil). Besides, the reference: N_max x
fraction sites at fraction 1.0, the same sampled sites a round as the largest N.

Per N: seconds per round (rounds 2.. when there are several: round 1 also loads the
model in each actor), seconds of a round outside site training (round seconds minus the
sampled sites' training seconds over the actors training in parallel), the federation's
start (Ray start-up, the describe query of every site), peak RSS of the coordinator and
of the actor processes, and the run store's size (run.db and the whole run folder).
`rss_ratio` = coordinator peak at the largest N / at the smallest; `round_ratio` =
seconds per round at the largest N / the reference's.

    fedmoe bench scale                                  # 10, 100, 1000 sites at fraction 0.1
    fedmoe bench scale --sites 4,8 --fraction 0.5 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DOMAINS = 2  # the smoke preset's


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", default="10,100,1000", help="comma-separated site counts, multiples of 2 (default 10,100,1000)")
    p.add_argument("--fraction", type=float, default=0.1, help="share of each domain's sites sampled a round (default 0.1)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds per N (default 3)")
    p.add_argument("--local-steps", type=int, default=1, help="optimizer steps per site per round (default 1)")
    p.add_argument("--batch-size", type=int, default=4, help="site batch size (default 4)")
    p.add_argument("--size-skew", type=float, default=1.0, help="lognormal sigma of the suite's site sizes (default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=float, default=0.2, help="seconds between memory samples (default 0.2)")
    p.add_argument("--keep-runs", help="folder to keep each N's run folder in (default: temporary)")


# -- the coordinator: one federation, in its own process ---------------------------------------------
def coordinator(cfg: dict) -> dict:
    """Run one federation (no scoring, baselines or gates: the federation is what scales)."""
    from dataclasses import replace

    from fedmoe.server.federation.run_config import FederationPlan
    from fedmoe.server.federation.run_store import RunStore
    from fedmoe.shared.data import find_sites, site_ref
    from fedmoe.simulations.presets import PRESETS, with_overrides
    from fedmoe.simulations.simulate import preset_strategy, run_flower, site_plan_for

    t0 = time.perf_counter()
    preset = with_overrides(PRESETS["smoke"], {"sites_per_domain": cfg["sites"] // DOMAINS, "fraction": cfg["fraction"],
                                                "local_steps": cfg["local_steps"], "batch_size": cfg["batch_size"],
                                                "seed": cfg["seed"]})
    strategy = replace(preset_strategy("smoke"), fraction=preset.fraction, local_steps=preset.local_steps,
                       batch_size=preset.batch_size, seed=preset.seed, eval_every=0)
    sites = [site_ref(p) for p in find_sites(cfg["suite"])]
    plan = FederationPlan(model_dir=cfg["model_dir"], out_dir=cfg["out"], rounds=cfg["rounds"], strategy=strategy,
                          expected_nodes=len(sites), preset="scale", query_timeout=3600.0)
    results = run_flower(plan, site_plan_for(sites, preset, cfg["model_dir"]), None)
    federation = time.perf_counter() - t0
    store = RunStore(cfg["out"], readonly=True)
    training: dict[int, list[float]] = {}
    for p in store.participation():
        if p["status"] == "ok":
            training.setdefault(p["round"], []).append(p["seconds"] or 0.0)
    failed = sum(1 for p in store.participation() if p["status"] != "ok")
    store.close()
    rounds = [{"round": h["round"], "seconds": h["seconds"], "sites": len(training.get(h["round"], [])),
               "site_training_seconds": sum(training.get(h["round"], []))} for h in results["history"]]
    return {"sites": len(sites), "federation_seconds": federation, "rounds": rounds, "failed_replies": failed,
            "rounds_seconds": sum(r["seconds"] for r in rounds)}


# -- memory: the coordinator and the Ray processes it starts ------------------------------------------
class MemorySampler:
    """Peak RSS of a process and of each of its descendants, sampled in a thread.
    Ray's worker processes rename themselves `ray::ClientAppActor` once they hold an actor."""

    def __init__(self, pid: int, every: float):
        import psutil

        self.root, self.every = psutil.Process(pid), every
        self.peak: dict[int, int] = {}
        self.title: dict[int, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fedmoe-rss-sampler", daemon=True)
        self.thread.start()

    def _run(self):
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    rss, cmd = proc.memory_info().rss, proc.cmdline()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), rss)
                title = " ".join(cmd)[:200]
                if "ClientAppActor" in title or proc.pid not in self.title:
                    self.title[proc.pid] = title
            self.stop.wait(self.every)

    def finish(self) -> dict:
        self.stop.set()
        self.thread.join(timeout=5)
        actors = [self.peak[p] for p, t in self.title.items() if "ClientAppActor" in t]
        others = [self.peak[p] for p, t in self.title.items() if p != self.root.pid and "ClientAppActor" not in t]
        mb = 2 ** 20
        return {"coordinator_peak_rss_mb": self.peak.get(self.root.pid, 0) / mb,
                "actor_peak_rss_mb": max(actors, default=0) / mb, "actors": len(actors),
                "actor_peak_rss_mb_each": sorted(round(a / mb, 1) for a in actors),
                "ray_other_peak_rss_mb": sum(others) / mb}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_one(n: int, fraction: float, args, model_dir: Path, runs: Path, log) -> dict:
    """One federation of `n` sites in a fresh coordinator process, its memory sampled from here."""
    from fedmoe.shared.errors import FedmoeError
    from fedmoe.shared.pretrain import cache_dir
    from fedmoe.simulations.domain_suite import make_suite

    suite = cache_dir() / "suites" / f"scale-d{DOMAINS}-s{n}-skew{args.size_skew:g}-seed{args.seed}"
    if not (suite / "mixed-eval.jsonl").exists():  # generated here, so the coordinator's peak is its own
        log(f"bench scale: writing a suite of {n} sites -> {suite}")
        make_suite(suite, DOMAINS, n, args.seed, size_skew=args.size_skew)
    out = runs / f"sites-{n}-fraction-{fraction:g}"
    cfg = {"sites": n, "fraction": fraction, "rounds": args.rounds, "local_steps": args.local_steps,
           "batch_size": args.batch_size, "seed": args.seed, "suite": str(suite), "model_dir": str(model_dir),
           "out": str(out)}
    result_file = runs / f"result-{n}-{fraction:g}.json"
    log(f"bench scale: {n} sites, fraction {fraction:g} ({args.rounds} rounds x {args.local_steps} steps) ...")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fedmoe.simulations.benchmarks.scale", json.dumps(cfg), str(result_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, RAY_DEDUP_LOGS="0"))
    sampler = MemorySampler(proc.pid, args.sample_every)
    tail: list[str] = []
    for line in proc.stderr:  # progress: the ServerApp's round lines, as they come
        tail = (tail + [line.rstrip()])[-20:]
        if line.startswith(("round ", "experts:")):
            log(f"  [{n} sites, {time.perf_counter() - t0:.0f}s] {line.rstrip()}")
    proc.wait()
    memory = sampler.finish()
    if proc.returncode != 0 or not result_file.exists():
        raise FedmoeError(f"bench scale: the {n}-site federation failed: {' | '.join(tail[-3:])[-400:]}")
    result = json.loads(result_file.read_text())
    steady = result["rounds"][1:] or result["rounds"]  # round 1 also loads the model in every actor
    actors = max(memory["actors"], 1)
    per_round = sum(r["seconds"] for r in steady) / len(steady)
    outside = sum(r["seconds"] - r["site_training_seconds"] / actors for r in steady) / len(steady)
    db = sum(p.stat().st_size for p in out.glob("run.db*"))
    entry = result | memory | {
        "fraction": fraction, "sampled_per_round": steady[-1]["sites"], "seconds_per_round": per_round,
        "outside_training_seconds_per_round": outside, "start_seconds": result["federation_seconds"] - result["rounds_seconds"],
        "run_db_bytes": db, "run_dir_bytes": folder_bytes(out), "wall_seconds": time.perf_counter() - t0}
    log(f"bench scale: {n} sites: {per_round:.2f}s a round ({entry['sampled_per_round']} sites), coordinator peak "
        f"{memory['coordinator_peak_rss_mb']:.0f} MB, actors {memory['actor_peak_rss_mb']:.0f} MB, run.db {db / 1e6:.2f} MB")
    return entry


def run(args) -> dict:
    from fedmoe.shared.errors import FedmoeError
    from fedmoe.shared.pretrain import ensure_default_model
    from fedmoe.simulations.benchmarks.aggregate import parse_list

    sizes = sorted(set(parse_list(args.sites, "sites")))
    if min(sizes) < DOMAINS or any(n % DOMAINS for n in sizes):
        raise FedmoeError(f"--sites: each count must be a multiple of {DOMAINS} (the smoke preset's domains), got {args.sites}")
    if not 0 < args.fraction <= 1:
        raise FedmoeError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.rounds < 1 or args.local_steps < 1 or args.batch_size < 1:
        raise FedmoeError("--rounds, --local-steps and --batch-size must be >= 1")
    reference = DOMAINS * max(1, round(max(sizes) * args.fraction / DOMAINS))  # the sites a round samples at N max

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    model_dir = ensure_default_model(progress=log)
    with tempfile.TemporaryDirectory(prefix="fedmoe-bench-scale-") as tmp:
        runs = Path(args.keep_runs) if args.keep_runs else Path(tmp)
        runs.mkdir(parents=True, exist_ok=True)
        per_n = [run_one(n, args.fraction, args, model_dir, runs, log) for n in sizes]
        reused = args.fraction == 1.0 and reference in sizes  # at fraction 1 the reference is one of the runs
        ref = per_n[sizes.index(reference)] if reused else run_one(reference, 1.0, args, model_dir, runs, log)
    small, large = per_n[0], per_n[-1]
    return {
        "benchmark": "scale", "preset": "smoke", "sites": sizes, "fraction": args.fraction, "rounds": args.rounds,
        "local_steps": args.local_steps, "batch_size": args.batch_size, "size_skew": args.size_skew, "seed": args.seed,
        "per_n": per_n, "reference": ref, "reference_is_a_run_above": reused,
        "rss_ratio": large["coordinator_peak_rss_mb"] / small["coordinator_peak_rss_mb"],
        "actor_rss_ratio": (large["actor_peak_rss_mb"] / small["actor_peak_rss_mb"]) if small["actor_peak_rss_mb"] else None,
        "round_ratio": large["seconds_per_round"] / ref["seconds_per_round"],
        "targets": {"rss_ratio": 1.5, "round_ratio": 1.3},
        "cpu_count": os.cpu_count(),
        "note": "one run per N on a shared machine: ratios are side by side in one command, seconds are noisy",
    }


def summary(result: dict) -> str:
    lines = [f"{'sites':>6} {'frac':>5} {'sampled':>7} {'s/round':>8} {'outside':>8} {'start s':>8} "
             f"{'coord MB':>9} {'actor MB':>9} {'run.db MB':>10}"]
    for e in result["per_n"] + [result["reference"]]:
        lines.append(f"{e['sites']:>6} {e['fraction']:>5g} {e['sampled_per_round']:>7} {e['seconds_per_round']:>8.2f} "
                     f"{e['outside_training_seconds_per_round']:>8.2f} {e['start_seconds']:>8.1f} "
                     f"{e['coordinator_peak_rss_mb']:>9.0f} {e['actor_peak_rss_mb']:>9.0f} {e['run_db_bytes'] / 1e6:>10.2f}")
    lines.append(f"rss_ratio {result['rss_ratio']:.2f} (target <= {result['targets']['rss_ratio']}), round_ratio "
                 f"{result['round_ratio']:.2f} (target <= {result['targets']['round_ratio']}; reference: "
                 f"{result['reference']['sites']} sites at fraction 1)")
    return "\n".join(lines)


def plot(result: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [e["sites"] for e in result["per_n"]]
    ref = result["reference"]
    panels = [("seconds_per_round", "seconds per round"), ("outside_training_seconds_per_round", "seconds outside site training"),
              ("coordinator_peak_rss_mb", "coordinator peak RSS (MB)"), ("actor_peak_rss_mb", "actor peak RSS (MB)"),
              ("run_db_bytes", "run.db (bytes)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(xs, [e[key] for e in result["per_n"]], marker="o", label=f"fraction {result['fraction']:g}")
        ax.scatter([ref["sites"]], [ref[key]], marker="s", color="#C44E52", label=f"{ref['sites']} sites at fraction 1")
        ax.set_xscale("log")
        ax.set_xlabel("sites (N)")
        ax.set_title(label, fontsize=10)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"fedmoe bench scale: rss_ratio {result['rss_ratio']:.2f}, round_ratio {result['round_ratio']:.2f}", fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # the coordinator process of one N: python -m ... CONFIG_JSON RESULT_FILE
    Path(sys.argv[2]).write_text(json.dumps(coordinator(json.loads(sys.argv[1]))))
