"""`fedmoe bench aggregate`: exact aggregation of N sites against naive FedIT, time and memory.

7B-like shapes: q and v projections (4096 x 4096) per layer, rank 16, random factors.
Sites are produced one at a time from a seed (never all N in memory): each site's
factors are a fixed pool of random factors rolled by site-specific shifts, so the sum
over sites has full rank Σr and producing a site costs a copy, not a random draw. Every
(method, N) runs in a fresh subprocess, so its peak resident memory (`ru_maxrss`) is
its own; the source alone (producing the sites, no arithmetic) is timed in the same
process and reported so both totals and source-free ("net") times can be compared.

Methods: `naive` (FedIT: running sums of A and B, one pass), `krylov` (exact: the
randomized block Krylov method `exact_lora_aggregate` runs above its stack limit, two
blocks of rank + --block-oversample, 4 passes), `stream` (exact: the
randomized range finder of `fedmoe.server.federation.streaming_aggregation`, 2 + 2·power_iters
passes; `stream0` is the same without power iterations, 2 passes), `qr` (exact: the stacked thin QRs of `fedmoe.server.federation.aggregation`; it holds the
N sites and a 4096 x Σr stack, so it runs only where Σr ≤ --qr-max-stack).

    fedmoe bench aggregate                          # 2 layers, N = 10, 100, 1000
    fedmoe bench aggregate --layers 32 --sites 10,100
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("naive", "krylov", "stream", "stream0", "qr")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", default="10,100,1000", help="comma-separated site counts (default 10,100,1000)")
    p.add_argument("--layers", type=int, default=2, help="transformer layers, each with q and v (default 2; a 7B has 32)")
    p.add_argument("--dim", type=int, default=4096, help="projection size, in = out (default 4096)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every site (default 16)")
    p.add_argument("--methods", default="naive,krylov,stream,stream0,qr",
                   help="comma-separated subset of naive,krylov,stream,stream0,qr")
    p.add_argument("--power-iters", type=int, default=1, help="power iterations of the streaming method (default 1)")
    p.add_argument("--oversample", type=int, default=8, help="extra sketch columns of the streaming method (default 8)")
    p.add_argument("--block-oversample", type=int, default=8,
                   help="extra columns per block of the block Krylov method (default 8, what the coordinator runs)")
    p.add_argument("--qr-max-stack", type=int, default=256, help="run qr only where N x rank <= this (default 256)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker (default 1: steadier on a shared machine; 0 = torch's choice)")
    p.add_argument("--accuracy-dim", type=int, default=1024, help="module size of the accuracy check (default 1024)")
    p.add_argument("--seed", type=int, default=0)


# -- the worker: one (method, N) in its own process --------------------------------------
def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class SiteSource:
    """Re-iterable stream of (LoraDelta, weight), site k made from the pool on demand."""

    POOL = 4

    def __init__(self, n: int, layers: int, dim: int, rank: int, seed: int):
        import torch

        self.n, self.rank = n, rank
        self.modules = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in ("q", "v")]
        g = torch.Generator().manual_seed(seed)
        self.pool = [[(torch.randn(rank, dim, generator=g) / dim**0.5, torch.randn(dim, rank, generator=g) / rank**0.5)
                      for _ in self.modules] for _ in range(self.POOL)]
        self.seed = seed

    def site(self, k: int):
        import torch

        from fedmoe.shared.delta import LoraDelta

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        shifts = torch.randint(0, self.pool[0][0][0].shape[1], (len(self.modules), 2), generator=g).tolist()
        factors = {m: (torch.roll(a, s[0], dims=1), torch.roll(b, s[1], dims=0))
                   for m, (a, b), s in zip(self.modules, self.pool[k % self.POOL], shifts)}
        return LoraDelta.from_factors(factors, self.rank, 2.0 * self.rank, "bench"), float(1 + k % 7)

    def __call__(self):
        return (self.site(k) for k in range(self.n))


def worker(cfg: dict) -> dict:
    import torch

    from fedmoe.server.federation.aggregation import exact_lora_aggregate
    from fedmoe.server.federation.streaming_aggregation import (block_krylov_lora_aggregate, naive_lora_aggregate_stream,
                                                                streaming_lora_aggregate)

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    warm = SiteSource(3, 1, 64, cfg["rank"], cfg["seed"])  # first linalg calls load libraries: not ours to time
    streaming_lora_aggregate(warm, cfg["rank"], power_iters=1), exact_lora_aggregate(list(warm()), cfg["rank"])
    naive_lora_aggregate_stream(warm), block_krylov_lora_aggregate(warm, cfg["rank"])
    src = SiteSource(cfg["sites"], cfg["layers"], cfg["dim"], cfg["rank"], cfg["seed"])
    t0 = time.perf_counter()
    for _ in src():  # the source alone: what producing the sites costs, per pass
        pass
    source_s = time.perf_counter() - t0
    base_rss = current_rss_mb()
    method = cfg["method"]
    t0 = time.perf_counter()
    if method == "naive":
        out, passes = naive_lora_aggregate_stream(src), 1
    elif method == "krylov":
        out, passes = block_krylov_lora_aggregate(src, cfg["rank"], oversample=cfg["block_oversample"]), 4
    elif method in ("stream", "stream0"):
        q = 0 if method == "stream0" else cfg["power_iters"]
        out = streaming_lora_aggregate(src, cfg["rank"], oversample=cfg["oversample"], power_iters=q)
        passes = 2 + 2 * q
    else:
        out, passes = exact_lora_aggregate(list(src()), cfg["rank"]), 1
    seconds = time.perf_counter() - t0
    assert len(out) == len(src.modules)
    return {"method": method, "sites": cfg["sites"], "seconds": seconds, "source_seconds_per_pass": source_s,
            "passes": passes, "net_seconds": max(seconds - passes * source_s, 0.0), "base_rss_mb": base_rss,
            "peak_rss_mb": peak_rss_mb(), "extra_peak_mb": peak_rss_mb() - base_rss, "threads": torch.get_num_threads()}


# -- the driver ---------------------------------------------------------------------------
def parse_list(text: str, what: str, cast=int) -> list:
    from fedmoe.shared.errors import FedmoeError

    try:
        items = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FedmoeError(f"--{what}: expected a comma-separated list, got {text!r}") from None
    if not items:
        raise FedmoeError(f"--{what}: empty list")
    return items


def accuracy_check(n: int, dim: int, rank: int, oversample: int, power_iters: int, seed: int, block_oversample: int = 8) -> dict:
    """One module, N sites: the streaming result's error against the dense truncated SVD
    of the sum (the optimum), as a ratio ||ΔW - approx|| / ||ΔW - best_r||."""
    import torch

    from fedmoe.server.federation.aggregation import dense_update, exact_lora_aggregate
    from fedmoe.server.federation.streaming_aggregation import block_krylov_lora_aggregate, streaming_lora_aggregate

    src = SiteSource(n, 1, dim, rank, seed)
    src.modules = src.modules[:1]
    src.pool = [p[:1] for p in src.pool]
    sites = list(src())
    total = sum(w for _, w in sites)
    m = src.modules[0]
    dense = sum(w / total * d.scaling * (d.factors(m)[1].double() @ d.factors(m)[0].double()) for d, w in sites)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    opt = float(s[rank:].norm())
    out = {"sites": n, "module_shape": [dim, dim], "optimal_residual": opt,
           "top_singular_values": [float(x) for x in s[: rank + 2]]}
    kr = block_krylov_lora_aggregate(sites, rank, oversample=block_oversample)
    out["krylov_error_over_optimal"] = float((dense - dense_update(kr, m).double()).norm()) / opt
    st = streaming_lora_aggregate(sites, rank, oversample=oversample, power_iters=power_iters)
    out["stream_error_over_optimal"] = float((dense - dense_update(st, m).double()).norm()) / opt
    st0 = streaming_lora_aggregate(sites, rank, oversample=oversample, power_iters=0)
    out["stream0_error_over_optimal"] = float((dense - dense_update(st0, m).double()).norm()) / opt
    if n * rank <= 4 * dim:
        qr = exact_lora_aggregate(sites, rank)
        out["qr_error_over_optimal"] = float((dense - dense_update(qr, m).double()).norm()) / opt
    return out


def run(args) -> dict:
    from fedmoe.shared.errors import FedmoeError

    sites = parse_list(args.sites, "sites")
    methods = parse_list(args.methods, "methods", str)
    bad = [m for m in methods if m not in METHODS]
    if bad or any(n < 1 for n in sites) or min(args.layers, args.dim, args.rank) < 1:
        raise FedmoeError(f"bench aggregate: methods must be among {','.join(METHODS)}, sites/layers/dim/rank >= 1")
    rows = []
    for n in sites:
        for method in methods:
            if method == "qr" and n * args.rank > args.qr_max_stack:
                continue
            cfg = {"method": method, "sites": n, "layers": args.layers, "dim": args.dim, "rank": args.rank,
                   "oversample": args.oversample, "block_oversample": args.block_oversample, "power_iters": args.power_iters, "threads": args.threads, "seed": args.seed}
            proc = subprocess.run([sys.executable, "-m", "fedmoe.simulations.benchmarks.aggregate", json.dumps(cfg)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise FedmoeError(f"bench aggregate worker ({method}, N={n}) failed: {proc.stderr.strip().splitlines()[-1:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {method:<7} N={n:<5} {rows[-1]['seconds']:8.2f}s  peak +{rows[-1]['extra_peak_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    ratios = {}
    for n in sites:
        by = {r["method"]: r for r in rows if r["sites"] == n}
        if "naive" in by:
            for m in ("krylov", "stream", "stream0", "qr"):
                if m in by:
                    ratios[f"{m}/naive N={n}"] = {
                        "time": by[m]["seconds"] / max(by["naive"]["seconds"], 1e-9),
                        "net_time": by[m]["net_seconds"] / max(by["naive"]["net_seconds"], 1e-9),
                        "extra_peak_mb": by[m]["extra_peak_mb"] - by["naive"]["extra_peak_mb"]}
    stream = [r for r in rows if r["method"] == "krylov"] or [r for r in rows if r["method"] == "stream"]
    growth = None
    if len(stream) >= 2:
        growth = {"method": stream[0]["method"], "from_sites": stream[0]["sites"], "to_sites": stream[-1]["sites"],
                  "extra_peak_mb": [stream[0]["extra_peak_mb"], stream[-1]["extra_peak_mb"]]}
    # A dense SVD of 4096 x 4096 costs minutes on two cores: the check uses one module of
    # at most --accuracy-dim (the methods' behaviour does not depend on the size).
    accuracy = accuracy_check(min(sites), min(args.dim, args.accuracy_dim), args.rank, args.oversample, args.power_iters,
                              args.seed, args.block_oversample)
    return {"benchmark": "aggregate", "config": vars(args) | {"func": None}, "modules": 2 * args.layers,
            "shape": [args.dim, args.dim], "rows": rows, "ratios": ratios, "stream_memory_growth": growth,
            "accuracy": accuracy, "cpu_count": os.cpu_count(),
            "note": "timings on a shared machine are noisy; ratios compare methods run back to back in one invocation"}


def summary(result: dict) -> str:
    lines = [f"aggregation of N sites, {result['modules']} modules of {result['shape'][0]}x{result['shape'][1]}, "
             f"rank {result['config']['rank']}",
             f"{'method':<8}{'N':>6}{'seconds':>10}{'net s':>9}{'source s/pass':>15}{'passes':>8}{'peak MB':>9}{'+MB':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['method']:<8}{r['sites']:>6}{r['seconds']:>10.2f}{r['net_seconds']:>9.2f}"
                     f"{r['source_seconds_per_pass']:>15.2f}{r['passes']:>8}{r['peak_rss_mb']:>9.0f}{r['extra_peak_mb']:>8.0f}")
    for k, v in result["ratios"].items():
        lines.append(f"{k}: time {v['time']:.2f}x (net of the source {v['net_time']:.2f}x), extra peak {v['extra_peak_mb']:+.0f} MB")
    a = result["accuracy"]
    lines.append(f"accuracy (one module, N={a['sites']}): error / optimal rank-r error: krylov "
                 f"{a['krylov_error_over_optimal']:.4f}, stream {a['stream_error_over_optimal']:.4f}, stream0 {a['stream0_error_over_optimal']:.4f}" + (f", qr {a['qr_error_over_optimal']:.4f}" if "qr_error_over_optimal" in a else ""))
    return "\n".join(lines)


def plot(result: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        pts = [(r["sites"], r["seconds"], r["extra_peak_mb"]) for r in result["rows"] if r["method"] == method]
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=method)
    for ax, label in ((ax1, "seconds"), (ax2, "peak memory above start (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("sites (N)")
        ax.set_ylabel(label)
        ax.legend()
    ax1.set_yscale("log")
    fig.suptitle(f"aggregation, {result['modules']} modules {result['shape'][0]}x{result['shape'][1]}, rank {result['config']['rank']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
