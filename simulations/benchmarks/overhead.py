"""`fedmoe bench overhead`: `fedmoe simulate` wall time against the sites' pure training time.

Runs `fedmoe simulate --preset P --no-baselines` in a fresh process and splits its wall
time using the run's own records: the sites' local training (`participation.seconds`
in the run store: the `train_lora` loop, summed over every site and round: the work a
simulation cannot avoid), the rounds' wall time (the strategy's `history`), the
federation (Ray start-up, describe queries with their model loads, rounds, expert
saves) and the rest (process start and imports, suite and model preparation,
scoring the experts). The headline ratio is simulate wall / Σ site training seconds
(1.0x is the limit); the same ratio over the federation alone is reported too.

    fedmoe bench overhead                       # default preset
    fedmoe bench overhead --preset smoke --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=["smoke", "default"], help="simulate preset (default: default)")
    p.add_argument("--rounds", type=int, help="federated rounds (default: the preset's)")
    p.add_argument("--baselines", action="store_true", help="include the baselines (their training is not site work)")
    p.add_argument("--keep-run", help="run folder to keep (default: a temporary folder)")


def run(args) -> dict:
    from fedmoe.shared.errors import FedmoeError

    with tempfile.TemporaryDirectory(prefix="fedmoe-bench-overhead-") as tmp:
        out = Path(args.keep_run) if args.keep_run else Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--preset", args.preset, "--out", str(out), "--json"]
        cmd += ["--rounds", str(args.rounds)] if args.rounds else []
        cmd += [] if args.baselines else ["--no-baselines"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RAY_DEDUP_LOGS="0"))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise FedmoeError(f"bench overhead: simulate failed: {proc.stderr.strip().splitlines()[-1:]}")
        return breakdown(out, wall, args.preset)


def breakdown(out: Path, wall: float, preset: str) -> dict:
    """Split a finished run's wall time (`wall`: the whole `fedmoe simulate` process)."""
    report = json.loads((out / "report.json").read_text())
    db = sqlite3.connect(out / "run.db")
    rows = db.execute("SELECT round, seconds FROM participation WHERE status = 'ok'").fetchall()
    db.close()
    train = sum(s or 0.0 for _, s in rows)
    rounds = sum(h["seconds"] for h in report["history"])
    per_round = {}
    for rnd, s in rows:
        per_round.setdefault(rnd, []).append(s or 0.0)
    fed = report["federation_seconds"]
    in_process = report["wall_seconds"]
    parts = {
        "site_training": train,
        "rounds_beyond_training": rounds - train,  # messaging, (de)serialization, aggregation, checkpoints; negative if sites overlap
        "federation_outside_rounds": fed - rounds,  # Ray start-up, describe (model loads), expert saves, shutdown
        "prepare_and_score": in_process - fed,  # suite/model preparation, scoring (evaluation, baselines if any)
        "process_start_and_imports": wall - in_process,
    }
    return {
        "benchmark": "overhead", "preset": preset, "rounds": report["rounds"], "sites": report["sites"],
        "site_participations": len(rows), "wall_seconds": wall, "federation_seconds": fed, "rounds_seconds": rounds,
        "site_training_seconds": train, "ratio_wall_to_training": wall / train if train else None,
        "ratio_federation_to_training": fed / train if train else None,
        "ratio_rounds_to_training": rounds / train if train else None,
        "round_seconds": [h["seconds"] for h in report["history"]],
        "training_seconds_per_round": {str(r): sum(v) for r, v in sorted(per_round.items())},
        "parts": parts, "cpu_count": os.cpu_count(),
        "note": "one run on a shared machine: the split is measured, its absolute seconds are noisy",
    }


def summary(result: dict) -> str:
    lines = [f"fedmoe simulate --preset {result['preset']} ({result['sites']} sites, {result['rounds']} rounds, "
             f"{result['site_participations']} site trainings)",
             f"wall {result['wall_seconds']:.1f}s, federation {result['federation_seconds']:.1f}s, rounds "
             f"{result['rounds_seconds']:.1f}s, sites' training {result['site_training_seconds']:.1f}s",
             f"overhead: wall/training {result['ratio_wall_to_training']:.2f}x, federation/training "
             f"{result['ratio_federation_to_training']:.2f}x, rounds/training {result['ratio_rounds_to_training']:.2f}x"]
    for k, v in result["parts"].items():
        lines.append(f"  {k:<28}{v:>9.1f}s  {100 * v / result['wall_seconds']:>5.1f}%")
    return "\n".join(lines)


def plot(result: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    left = 0.0
    for (name, v), color in zip(result["parts"].items(), ("#55A868", "#4C72B0", "#C44E52", "#8172B2", "#CCB974")):
        v = max(v, 0.0)
        ax.barh([0], [v], left=left, color=color, label=f"{name} {v:.0f}s")
        left += v
    ax.set_yticks([])
    ax.set_xlabel("seconds")
    ax.set_title(f"fedmoe simulate --preset {result['preset']}: {result['ratio_wall_to_training']:.2f}x the sites' training time")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
