"""`fedmoe bench deployment`: per-round overhead of a deployed federation vs simulation.

The same federation (two sites of a generated suite, the tiny model, few local steps)
runs three ways, one after the other on this machine:

- `simulation`: Flower's Simulation Engine, the ClientApp in long-lived Ray actors;
- `deployed`: `fedmoe coordinator start` + two `fedmoe site start` on 127.0.0.1: a
  SuperLink, SuperNodes, a fresh ClientApp process per message that forwards to the
  site daemon holding the model;
- `deployed-flower-poll`: the same as `deployed` with the SuperNode polling at Flower's
  own fixed 3 s (`--poll-interval 3`), the cost fedmoe's shorter poll removes;
- `deployed-no-daemon`: the same SuperLink, but bare `flower-supernode`s given
  `data-path`: each message's ClientApp process imports torch and loads the model.

Per round, overhead = the round's wall time (run.db) minus its slowest site's own
training time (what the site's trainer measured), i.e. everything that is not training.

    fedmoe bench deployment                       # 3 rounds, 1 local step
    fedmoe bench deployment --modes deployed --rounds 5

`round_vs_simulation` is a mode's mean round wall time over the simulated one's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmoe.shared.errors import FedmoeError

MODES = ("simulation", "deployed", "deployed-flower-poll", "deployed-no-daemon")
FLOWER_POLL_S = 3.0  # Flower 1.42's fixed SuperNode poll (see fedmoe.client.supernode)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=3, help="federated rounds per mode (default 3)")
    p.add_argument("--local-steps", type=int, default=1, help="local steps per round (default 1: overhead, not training)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--quant", default="none", help="site quantization: none (default) | nf4")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per mode (default 900)")
    p.add_argument("--poll-interval", type=float, default=None,
                   help="the `deployed` sites' SuperNode poll (default: `fedmoe site start`'s own)")


def site_latencies(run_dir: Path, work: Path) -> list[dict]:
    """From the site daemons' audit logs: per round, how long after the round started the
    last TRAIN reached a daemon (`to_site_s`), and how long after the last daemon replied
    the round ended (`from_site_s`)."""
    import json

    from fedmoe.server.federation.run_store import RunStore

    entries = [json.loads(line) for f in sorted(work.glob("site-*/audit.jsonl")) for line in f.read_text().splitlines()]
    store = RunStore(run_dir, readonly=True)
    try:
        rounds = store.rounds()
    finally:
        store.close()
    out = []
    for r in rounds:
        trains = [e for e in entries if e["message"] == "train" and e.get("round") == r["round"]]
        if trains and r["finished"]:
            out.append({"round": r["round"], "to_site_s": max(e["arrived"] for e in trains) - r["started"],
                        "from_site_s": r["finished"] - max(e["time"] for e in trains)})
    return out


def round_overheads(run_dir: Path) -> dict:
    from fedmoe.server.federation.run_store import RunStore

    store = RunStore(run_dir, readonly=True)
    try:
        rounds = store.rounds()
        rows = [dict(r) for r in store.db.execute("SELECT round, status, seconds FROM participation")]
        run = store.run()
    finally:
        store.close()
    out = []
    for r in rounds:
        if r["state"] != "committed":
            continue
        train = max((p["seconds"] or 0.0 for p in rows if p["round"] == r["round"] and p["status"] == "ok"), default=0.0)
        wall = r["finished"] - r["started"]
        out.append({"round": r["round"], "wall_s": wall, "train_s": train, "overhead_s": wall - train,
                    "failed": sum(1 for p in rows if p["round"] == r["round"] and p["status"] != "ok")})
    return {"rounds": out, "run_started": run.get("started"),
            "first_round_started": rounds[0]["started"] if rounds else None}


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def run_simulation(suite: Path, model: Path, out: Path, args) -> float:
    from fedmoe.server.federation.server_app import FederationPlan
    from fedmoe.server.federation.strategy import StrategyConfig
    from fedmoe.shared.data import find_sites, load_site
    from fedmoe.simulations.simulate import run_flower

    sites = [load_site(p) for p in find_sites(suite)]
    site_plan = [{"data-path": str(s.path), "domain": s.domain, "rank": 4, "quant": args.quant, "model-path": str(model)}
                 for s in sites]
    strategy = StrategyConfig(local_steps=args.local_steps, batch_size=args.batch_size, round_timeout=args.timeout)
    plan = FederationPlan(model_dir=str(model), out_dir=str(out), rounds=args.rounds, strategy=strategy,
                          expected_nodes=len(sites), preset="bench-deployment")
    started = time.perf_counter()
    run_flower(plan, site_plan, None)
    return time.perf_counter() - started


def _spawn(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run_deployed(suite: Path, model: Path, out: Path, work: Path, args, daemon: bool, poll: float | None = None) -> float:
    from fedmoe.shared.network import free_port
    from fedmoe.shared.processes import stop_group
    from fedmoe.shared.data import find_sites

    env = dict(os.environ, PYTHONUNBUFFERED="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_HOME=str(work / "flwr-home"))
    # One thread per site process, as each simulated site (a Ray actor with num_cpus=1) has.
    site_env = dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    port = free_port()
    fedmoe = [sys.executable, "-m", "fedmoe.shared.cli"]
    sites = find_sites(suite)
    procs = []
    started = time.perf_counter()
    try:
        coord = _spawn(fedmoe + ["coordinator", "start", "--insecure", "--port", str(port), "--out", str(out),
                                 "--rounds", str(args.rounds), "--expected-sites", str(len(sites)),
                                 "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size),
                                 "--round-timeout", str(args.timeout), "--model", str(model), "--timeout", str(args.timeout),
                                 "--quiet"], work / "coordinator.log", env)
        procs.append(coord)
        for i, path in enumerate(sites):
            if daemon:
                cmd = fedmoe + ["site", "start", "--insecure", "--superlink", f"127.0.0.1:{port}", "--data", str(path),
                                "--quant", args.quant, "--rank", "4", "--model", str(model), "--work-dir", str(work / f"site-{i}")]
                cmd += ["--poll-interval", str(poll)] if poll is not None else []
            else:
                node_config = f"data-path='{path}' quant='{args.quant}' rank=4 model-path='{model}'"
                cmd = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                       "--node-config", node_config]
            procs.append(_spawn(cmd, work / f"site-{i}.log", site_env))
        try:
            rc = coord.wait(args.timeout + 120)
        except subprocess.TimeoutExpired:
            raise FedmoeError(f"deployment did not finish within {args.timeout:.0f}s; logs in {work}") from None
        if rc != 0:
            raise FedmoeError(f"coordinator exited with {rc}; see {work / 'coordinator.log'} and {out}/coordinator.log")
        return time.perf_counter() - started
    finally:
        for p in procs:
            stop_group(p, grace=5)


def clientapp_import_seconds() -> dict:
    """Start-up cost of one ClientApp process's imports: the forwarding shim vs the site code."""
    out = {}
    for name, code in (("shim", "import flwr.clientapp, fedmoe.client.client_app"),
                       ("in_process", "import flwr.clientapp, fedmoe.client.client_app, fedmoe.client.site, fedmoe.client.trainer")):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        out[name] = time.perf_counter() - t
    return out


def run(args) -> dict:
    from fedmoe.shared.pretrain import ensure_default_model
    from fedmoe.simulations.domain_suite import make_suite

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise FedmoeError(f"unknown mode {bad[0]!r}: choose from {', '.join(MODES)}")
    if args.rounds < 1:
        raise FedmoeError(f"--rounds must be >= 1, got {args.rounds}")
    model = ensure_default_model()
    tmp = Path(tempfile.mkdtemp(prefix="fedmoe-bench-deploy-"))
    try:
        suite = tmp / "suite"
        make_suite(suite, domains=2, sites=2, seed=0)
        result: dict = {"rounds": args.rounds, "local_steps": args.local_steps, "quant": args.quant, "sites": 2,
                        "cpu_count": os.cpu_count(), "load_avg_before": os.getloadavg()[0], "modes": {}}
        for mode in modes:
            out, work = tmp / f"run-{mode}", tmp / f"work-{mode}"
            work.mkdir()
            print(f"bench deployment: {mode} ...", file=sys.stderr, flush=True)
            if mode == "simulation":
                wall = run_simulation(suite, model, out, args)
            else:
                poll = FLOWER_POLL_S if mode == "deployed-flower-poll" else args.poll_interval
                wall = run_deployed(suite, model, out, work, args, daemon=(mode != "deployed-no-daemon"), poll=poll)
            r = round_overheads(out)
            rounds = r["rounds"]
            result["modes"][mode] = {
                "wall_s": wall, "rounds": rounds,
                "mean_round_s": _mean(x["wall_s"] for x in rounds),
                "mean_train_s": _mean(x["train_s"] for x in rounds),
                "mean_overhead_s": _mean(x["overhead_s"] for x in rounds),
                "setup_s": (r["first_round_started"] - r["run_started"]) if r["first_round_started"] else None,
            }
            if mode in ("deployed", "deployed-flower-poll"):
                lat = site_latencies(out, work)
                result["modes"][mode]["latency"] = lat
                result["modes"][mode]["mean_to_site_s"] = _mean(x["to_site_s"] for x in lat)
                result["modes"][mode]["mean_from_site_s"] = _mean(x["from_site_s"] for x in lat)
        result["clientapp_imports_s"] = clientapp_import_seconds()
        result["load_avg_after"] = os.getloadavg()[0]
        sim = result["modes"].get("simulation", {})
        for mode, m in result["modes"].items():
            if sim and mode != "simulation":
                m["overhead_vs_simulation"] = m["mean_overhead_s"] / sim["mean_overhead_s"]
                m["round_vs_simulation"] = m["mean_round_s"] / sim["mean_round_s"]
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summary(result: dict) -> str:
    lines = [f"{result['sites']} sites, {result['rounds']} rounds, {result['local_steps']} local step(s), {result['quant']}; "
             f"{result['cpu_count']} CPUs, load average {result['load_avg_before']:.1f} -> {result['load_avg_after']:.1f}",
             f"{'mode':<22}{'round s':>9}{'train s':>9}{'overhead s':>12}{'x sim':>7}{'overhead per round':>30}"]
    for mode, m in result["modes"].items():
        per = " ".join(f"{x['overhead_s']:.1f}" for x in m["rounds"])
        ratio = f"{m['round_vs_simulation']:.2f}" if "round_vs_simulation" in m else "-"
        lines.append(f"{mode:<22}{m['mean_round_s']:>9.1f}{m['mean_train_s']:>9.1f}{m['mean_overhead_s']:>12.1f}{ratio:>7}{per:>30}")
    for mode in ("deployed", "deployed-flower-poll"):
        if "mean_to_site_s" in result["modes"].get(mode, {}):
            m = result["modes"][mode]
            lines.append(f"{mode}: a TRAIN reaches the site daemon {m['mean_to_site_s']:.1f}s after the round starts; "
                         f"the round ends {m['mean_from_site_s']:.1f}s after the daemon replies")
    imp = result["clientapp_imports_s"]
    lines.append(f"ClientApp process imports: shim {imp['shim']:.1f}s, in-process site code {imp['in_process']:.1f}s")
    return "\n".join(lines)


if __name__ == "__main__":  # a quick way to run it without the CLI
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    print(summary(run(ap.parse_args())))
