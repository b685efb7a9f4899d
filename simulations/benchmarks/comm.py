"""`fedmoe bench comm`: adapter bytes on the wire and the accuracy effect, fp32 vs fp16 vs int8.

Two parts, one invocation. **Wire**: one adapter at the default model's shapes and at
7B-like shapes (q and v, 4096 x 4096, 32 layers, rank 16) encoded by each codec; bytes
are what the Flower ArrayRecord carries (`fedmoe.shared.compression.record_bytes`).
**Federation**: `fedmoe simulate --compression C` once per codec on the same preset and
seed, back to back, each in a fresh process; from each run's report: bytes per site per
round (up, down) as recorded in the run store, and the mixed accuracy of the domain
experts (`experts_oracle`). Ratios are against `none` (fp32).

    fedmoe bench comm                          # default preset, 3 codecs
    fedmoe bench comm --preset smoke --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CODECS = ("none", "fp16", "int8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=["smoke", "default"], help="simulate preset (default: default)")
    p.add_argument("--rounds", type=int, help="federated rounds (default: the preset's)")
    p.add_argument("--codecs", default="none,fp16,int8", help="comma-separated codecs (default none,fp16,int8)")
    p.add_argument("--baselines", action="store_true", help="also train and score the baselines in each run (slower)")
    p.add_argument("--wire-only", action="store_true", help="only the encoded sizes, no federation runs")
    p.add_argument("--keep-runs", help="folder to keep the run folders in (default: a temporary folder)")


def wire_sizes(name: str, modules: dict[str, tuple[int, int]], rank: int) -> dict:
    import torch

    from fedmoe.shared import compression
    from fedmoe.shared.delta import LoraDelta

    g = torch.Generator().manual_seed(0)
    base = LoraDelta.from_factors({m: (torch.randn(rank, i, generator=g) / i**0.5, torch.zeros(o, rank))
                                   for m, (i, o) in modules.items()}, rank, 2.0 * rank, "bench")
    trained = LoraDelta({k: v + 1e-2 * torch.randn(v.shape, generator=g) for k, v in base.tensors.items()},
                        rank, 2.0 * rank, "bench")
    out = {"shapes": name, "modules": len(modules), "rank": rank, "payload_fp32_bytes": trained.num_bytes(), "codecs": {}}
    for codec in CODECS:
        arrays, _, decoded = compression.encode(trained, codec, base=None if codec == "none" else base)
        err = max(float((decoded.tensors[k] - trained.tensors[k]).abs().max()) for k in trained.tensors)
        out["codecs"][codec] = {"bytes": compression.record_bytes(arrays), "max_abs_error_of_update": err}
    fp32 = out["codecs"]["none"]["bytes"]
    for c in out["codecs"].values():
        c["ratio_to_fp32"] = c["bytes"] / fp32
    return out


def default_model_modules() -> dict[str, tuple[int, int]]:
    from fedmoe.shared.modeling import adapter_spec_for
    from fedmoe.shared.pretrain import ensure_default_model

    return adapter_spec_for(ensure_default_model()).modules


def run_sim(preset: str, rounds: int | None, codec: str, out: Path, baselines: bool) -> dict:
    from fedmoe.shared.errors import FedmoeError

    cmd = [sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--preset", preset, "--compression", codec,
           "--out", str(out), "--json"]
    cmd += ["--rounds", str(rounds)] if rounds else []
    cmd += [] if baselines else ["--no-baselines"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RAY_DEDUP_LOGS="0"))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise FedmoeError(f"bench comm: simulate --compression {codec} failed: {proc.stderr.strip().splitlines()[-1:]}")
    report = json.loads((out / "report.json").read_text())
    return {"codec": codec, "wall_seconds": wall, "bytes_per_site_round": report["bytes_per_site_round"],
            "mixed": {m: v["mixed"] for m, v in report["methods"].items()},
            "experts_per_domain": report["methods"]["experts_oracle"]["per_domain"],
            "final_train_loss": {e: m.get("train_loss") for e, m in report["history"][-1]["metrics"].items()}}


def run(args) -> dict:
    from fedmoe.shared.errors import FedmoeError

    codecs = [c for c in args.codecs.split(",") if c]
    if not codecs or any(c not in CODECS for c in codecs):
        raise FedmoeError(f"--codecs: choose among {','.join(CODECS)}, got {args.codecs!r}")
    seven_b = {f"model.layers.{i}.self_attn.{p}_proj": (4096, 4096) for i in range(32) for p in ("q", "v")}
    result = {"benchmark": "comm", "preset": args.preset, "rounds": args.rounds,
              "wire": [wire_sizes("default model, rank 8", default_model_modules(), 8),
                       wire_sizes("7B-like q,v 4096x4096 x32 layers, rank 16", seven_b, 16)],
              "runs": [], "ratios": {}}
    if not args.wire_only:
        keep = Path(args.keep_runs) if args.keep_runs else None
        with tempfile.TemporaryDirectory(prefix="fedmoe-bench-comm-") as tmp:
            root = keep or Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            for codec in codecs:
                out = root / f"{args.preset}-{codec}"
                if (out / "run.db").exists():
                    raise FedmoeError(f"{out} already holds a run; choose another --keep-runs")
                print(f"  simulate --preset {args.preset} --compression {codec} ...", file=sys.stderr, flush=True)
                result["runs"].append(run_sim(args.preset, args.rounds, codec, out, args.baselines))
        by = {r["codec"]: r for r in result["runs"]}
        if "none" in by:
            ref = by["none"]
            for codec, r in by.items():
                result["ratios"][codec] = {
                    "bytes_per_site_round": r["bytes_per_site_round"]["total"] / ref["bytes_per_site_round"]["total"],
                    "mixed_accuracy_points": 100 * (r["mixed"]["experts_oracle"] - ref["mixed"]["experts_oracle"])}
    result["note"] = "bytes are exact counts; accuracies come from one seed; wall times on a shared machine are noisy"
    return result


def summary(result: dict) -> str:
    lines = []
    for w in result["wire"]:
        lines.append(f"wire, {w['shapes']} ({w['modules']} modules): " + ", ".join(
            f"{c} {v['bytes'] / 1e6:.3f} MB ({v['ratio_to_fp32']:.3f}x)" for c, v in w["codecs"].items()))
    if result["runs"]:
        lines.append(f"simulate --preset {result['preset']}:")
        lines.append(f"{'codec':<6}{'kB/site/round':>15}{'up kB':>9}{'down kB':>9}{'experts mixed':>15}{'ratio':>8}{'Δ points':>10}")
        for r in result["runs"]:
            b, rat = r["bytes_per_site_round"], result["ratios"].get(r["codec"], {})
            lines.append(f"{r['codec']:<6}{b['total'] / 1e3:>15.1f}{b['up'] / 1e3:>9.1f}{b['down'] / 1e3:>9.1f}"
                         f"{r['mixed']['experts_oracle']:>15.3f}{rat.get('bytes_per_site_round', float('nan')):>8.3f}"
                         f"{rat.get('mixed_accuracy_points', float('nan')):>+10.1f}")
    return "\n".join(lines)


def plot(result: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    w = result["wire"][-1]
    names = list(w["codecs"])
    axes[0].bar(names, [w["codecs"][c]["ratio_to_fp32"] for c in names], color="#4C72B0")
    axes[0].axhline(0.27, color="r", ls="--", label="int8 target 0.27x")
    axes[0].set_ylabel("bytes / fp32 bytes")
    axes[0].set_title(w["shapes"], fontsize=9)
    axes[0].legend()
    if result["runs"]:
        names = [r["codec"] for r in result["runs"]]
        axes[1].bar(names, [r["mixed"]["experts_oracle"] for r in result["runs"]], color="#55A868")
        for i, r in enumerate(result["runs"]):
            axes[1].text(i, r["mixed"]["experts_oracle"], f"{r['bytes_per_site_round']['total'] / 1e3:.0f} kB/site/rd",
                         ha="center", va="bottom", fontsize=8)
        axes[1].set_ylim(0, 1)
        axes[1].set_ylabel("experts mixed accuracy")
        axes[1].set_title(f"simulate --preset {result['preset']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
