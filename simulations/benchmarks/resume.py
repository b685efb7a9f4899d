"""`fedmoe bench resume`: a simulation SIGKILLed K times and resumed, against one never killed.

Runs `fedmoe simulate --preset P --no-moe --no-mia` (plus `--no-baselines` unless
`--baselines`) twice, each in a fresh process: once straight through, once killed with
SIGKILL (the whole process group: coordinator and Ray workers) at K seeded random
moments and restarted with `--resume` after each kill, until it finishes. Kill moments
are drawn (seeded by `--seed`) uniformly in [0.1, 1.0] x the uninterrupted run's wall
time after each (re)start, so they land anywhere: Ray start-up, a round in flight, a
checkpoint or SQLite write, expert saving, scoring. A run that ends before its kill
moment is not killed.

Compared: the report numbers of the federated methods (`experts_oracle`, and
`fedavg_single` with `--baselines`), and in `run.db` the committed rounds (no gap, no
duplicate), the per-round metrics, the participation rows and the tensors of every
checkpoint (content checksums). The MoE stage is left out: it only reads the finished experts.

    fedmoe bench resume --preset smoke --kills 2
    fedmoe bench resume --kills 3 --seed 1        # default preset

The helpers (`run_simulate`, `committed_rounds`, `federation_record`) also serve the
crash tests (tests/test_fault_injection.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Methods whose numbers come from the federation (the others do not depend on it).
FEDERATED_METHODS = ("experts_oracle", "fedavg_single")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=["smoke", "default"], help="simulate preset (default: default)")
    p.add_argument("--rounds", type=int, help="federated rounds (default: the preset's)")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs of the interrupted run (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (the federation keeps the preset's seed)")
    p.add_argument("--baselines", action="store_true", help="also run the baselines, to compare fedavg_single (slower)")
    p.add_argument("--keep-runs", help="folder to keep both run folders in (default: a temporary folder)")


def simulate_cmd(out: Path, preset: str = "smoke", rounds: int | None = None, baselines: bool = False,
                 resume: bool = False) -> list[str]:
    """The `fedmoe simulate` command line of a crash check (no MoE stage, no MIA)."""
    if resume:
        return [sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--resume", str(out)]
    cmd = [sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--preset", preset, "--out", str(out), "--no-moe", "--no-mia"]
    return cmd + (["--rounds", str(rounds)] if rounds else []) + ([] if baselines else ["--no-baselines"])


def run_simulate(cmd: list[str], fault: str | None = None, kill_after: float | None = None, timeout: float = 1800,
                 watch: Path | None = None) -> dict:
    """Run `cmd` in its own session; FEDMOE_FAULT=`fault` if given; SIGKILL its process group
    `kill_after` seconds in (if still running). Whatever is left of the group afterwards
    (Ray workers of a killed coordinator) is SIGKILLed too. With `watch` (a run folder),
    the committed round count is sampled as it runs: [(seconds, rounds), ...]."""
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    env.pop("FEDMOE_FAULT", None)
    if fault:
        env["FEDMOE_FAULT"] = fault
    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        killed, timeline = False, []
        try:
            while proc.poll() is None:
                now = time.monotonic() - t0
                if kill_after is not None and now >= kill_after:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                    proc.wait()
                    break
                if now > timeout:
                    raise TimeoutError(f"{' '.join(cmd[-4:])} ran past {timeout:.0f}s")
                if watch is not None:
                    timeline.append((now, len(committed_rounds(watch))))
                time.sleep(0.25)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        seconds = time.monotonic() - t0
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if watch is not None:
        timeline.append((seconds, len(committed_rounds(watch))))
    return {"returncode": proc.returncode, "seconds": seconds, "killed": killed, "stderr": stderr, "timeline": timeline}


def committed_rounds(run_dir: Path) -> list[int]:
    """Committed round numbers in `run_dir`/run.db ([] if none yet or unreadable)."""
    try:
        db = sqlite3.connect(f"file:{Path(run_dir) / 'run.db'}?mode=ro", uri=True, timeout=1)
        try:
            return [r for (r,) in db.execute("SELECT round FROM rounds WHERE state = 'committed' ORDER BY round")]
        finally:
            db.close()
    except sqlite3.Error:
        return []


def federation_record(run_dir: Path) -> dict:
    """What a run's federation decided, without timings and node ids (which differ across
    restarts): rounds and their states, metrics, participation, and each checkpoint's
    tensors by their content checksum. (Not the file sha256 the run store keeps for
    integrity: safetensors writes its metadata in a per-process hash order, so equal
    tensors can make different files.)"""
    from fedmoe.shared.delta import LoraDelta

    db = sqlite3.connect(f"file:{Path(run_dir) / 'run.db'}?mode=ro", uri=True)
    try:
        return {
            "rounds": db.execute("SELECT round, state FROM rounds ORDER BY round").fetchall(),
            "metrics": db.execute("SELECT round, expert, name, value FROM metrics ORDER BY round, expert, name").fetchall(),
            "participation": db.execute("SELECT round, site, expert, status, loss, num_examples, bytes_in, bytes_out, reason "
                                        "FROM participation ORDER BY round, expert, site").fetchall(),
            "checkpoints": [(rnd, expert, path, LoraDelta.load(Path(run_dir) / path).checksum()) for rnd, expert, path in
                            db.execute("SELECT round, expert, path FROM checkpoints ORDER BY round, expert")],
        }
    finally:
        db.close()


def federated_numbers(report: dict) -> dict:
    return {m: {"per_domain": v["per_domain"], "mixed": v["mixed"]} for m, v in report["methods"].items() if m in FEDERATED_METHODS}


def run(args) -> dict:
    from fedmoe.shared.errors import FedmoeError

    if args.kills < 1:
        raise FedmoeError(f"--kills must be >= 1, got {args.kills}")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="fedmoe-bench-resume-") as tmp:
        root = Path(args.keep_runs) if args.keep_runs else Path(tmp)
        ref_dir, killed_dir = root / "uninterrupted", root / "killed"
        for d in (ref_dir, killed_dir):
            if (d / "run.db").exists():
                raise FedmoeError(f"{d} already holds a run; choose another --keep-runs")
        ref = run_simulate(simulate_cmd(ref_dir, args.preset, args.rounds, args.baselines), watch=ref_dir)
        if ref["returncode"] != 0:
            raise FedmoeError(f"bench resume: the uninterrupted run failed: {ref['stderr'].strip().splitlines()[-1:]}")
        attempts, elapsed = [], 0.0
        for i in range(args.kills + 1):
            at = rng.uniform(0.1, 1.0) * ref["seconds"] if i < args.kills else None
            r = run_simulate(simulate_cmd(killed_dir, args.preset, args.rounds, args.baselines, resume=i > 0),
                             kill_after=at, watch=killed_dir)
            attempts.append({"attempt": i, "resume": i > 0, "kill_after_seconds": at, "killed": r["killed"],
                             "start_seconds": elapsed, "seconds": r["seconds"], "returncode": r["returncode"],
                             "committed_after": committed_rounds(killed_dir),
                             "timeline": [(elapsed + t, n) for t, n in r["timeline"]],
                             "resumed_from": next((l for l in r["stderr"].splitlines() if l.startswith("resuming")), None)})
            elapsed += r["seconds"]
            if not r["killed"]:
                if r["returncode"] != 0:
                    raise FedmoeError(f"bench resume: attempt {i} failed: {r['stderr'].strip().splitlines()[-1:]}")
                break
        want = json.loads((ref_dir / "report.json").read_text())
        got = json.loads((killed_dir / "report.json").read_text())
        a, b = federation_record(ref_dir), federation_record(killed_dir)
        same = {"report_numbers": federated_numbers(want) == federated_numbers(got)} | {k: a[k] == b[k] for k in a}
        rounds = [r for r, _ in b["rounds"]]
        return {
            "benchmark": "resume", "preset": args.preset, "rounds": want["rounds"], "kill_seed": args.seed,
            "kills_requested": args.kills, "kills": sum(x["killed"] for x in attempts),
            "uninterrupted": {"seconds": ref["seconds"], "mixed": {m: v["mixed"] for m, v in federated_numbers(want).items()},
                              "timeline": ref["timeline"]},
            "killed_and_resumed": {"seconds": elapsed, "mixed": {m: v["mixed"] for m, v in federated_numbers(got).items()}},
            "attempts": attempts, "same": same, "all_same": all(same.values()),
            "rounds_in_run_db": rounds, "no_gap_no_duplicate": rounds == list(range(1, want["rounds"] + 1)),
            "cpu_count": os.cpu_count(),
        }


def summary(result: dict) -> str:
    lines = [f"fedmoe simulate --preset {result['preset']} ({result['rounds']} rounds): uninterrupted "
             f"{result['uninterrupted']['seconds']:.0f}s; killed {result['kills']}x and resumed: "
             f"{result['killed_and_resumed']['seconds']:.0f}s in {len(result['attempts'])} processes"]
    for a in result["attempts"]:
        what = f"SIGKILL at {a['kill_after_seconds']:.1f}s" if a["killed"] else "ran to the end"
        lines.append(f"  attempt {a['attempt']}: {what}; committed rounds after: {a['committed_after']}"
                     + (f"; {a['resumed_from']}" if a["resumed_from"] else ""))
    for m, v in result["uninterrupted"]["mixed"].items():
        lines.append(f"  {m:<16} mixed: uninterrupted {v:.3f}  killed+resumed {result['killed_and_resumed']['mixed'].get(m, float('nan')):.3f}")
    lines.append("  same: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["same"].items())
                 + f"; rounds in run.db {result['rounds_in_run_db']}")
    return "\n".join(lines)


def plot(result: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, tl) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2]})
    methods = list(result["uninterrupted"]["mixed"])
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], [result["uninterrupted"]["mixed"][m] for m in methods], 0.4, label="uninterrupted", color="#4C72B0")
    ax.bar([x + 0.2 for x in xs], [result["killed_and_resumed"]["mixed"].get(m, 0) for m in methods], 0.4,
           label=f"killed {result['kills']}x + resumed", color="#DD8452")
    for x, m in zip(xs, methods):
        for dx, run in ((-0.2, "uninterrupted"), (0.2, "killed_and_resumed")):
            v = result[run]["mixed"].get(m, 0)
            ax.text(x + dx, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), methods)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mixed exact-match accuracy")
    ax.legend(fontsize=8)
    ax.set_title("federated methods", fontsize=9)
    ref = result["uninterrupted"]["timeline"]
    tl.step([t for t, _ in ref], [n for _, n in ref], where="post", label="uninterrupted", color="#4C72B0")
    pts = [p for a in result["attempts"] for p in a["timeline"]]
    tl.step([t for t, _ in pts], [n for _, n in pts], where="post", label="killed + resumed", color="#DD8452")
    for a in result["attempts"]:
        if a["killed"]:
            t = a["start_seconds"] + a["kill_after_seconds"]
            tl.axvline(t, color="r", ls="--", lw=1)
            tl.text(t, 0.1, " SIGKILL", color="r", fontsize=7, rotation=90, va="bottom")
    tl.set_xlabel("seconds since start (restarts included)")
    tl.set_ylabel("committed rounds in run.db")
    tl.set_yticks(range(result["rounds"] + 1))
    tl.set_title(f"preset {result['preset']}: same numbers: {'yes' if result['all_same'] else 'NO'}", fontsize=9)
    tl.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
