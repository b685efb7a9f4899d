"""`fedmoe bench serve`: the OpenAI-compatible HTTP API under C concurrent clients.

One `OpenAIServer` (uvicorn + the continuous-batching decoder) over one loaded model, in
this process; client threads send `/v1/completions` over loopback HTTP, C at a time,
prompts from the mixed eval set (every domain, interleaved). Two workloads at each C:

- "gated": model `fedmoe`, the gate routes each prompt, so a decoding step mixes experts
  (peft `adapter_names` per row);
- "one expert": model `expert/<first>` for every request: the same batching with a
  single active LoRA, the best case for a batch.

Every request decodes exactly --new-tokens tokens (`ignore_eos`, vLLM's extension), so
cells compare equal work. C = 1 is one request at a time. Reported per cell: completion tokens/s (usage counts
over wall time), p50/p95 request latency, the decoder's mean batch and share of steps
that mixed experts; and each throughput as a ratio to C = 1 of the same workload.

    fedmoe bench serve --run OUT         # a finished run's experts and default gate
    fedmoe bench serve                   # the tiny model, 4 random experts, a fresh suite
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from fedmoe.shared.errors import FedmoeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="run folder with experts/ (and gates/); default: a synthetic set-up on the tiny model")
    p.add_argument("--gate", help="gate for model `fedmoe` (default: the run's best; synthetic: prototype)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    p.add_argument("--requests", type=int, default=32, help="requests per cell (default 32)")
    p.add_argument("--new-tokens", type=int, default=16, help="max_tokens per request (default 16)")
    p.add_argument("--max-batch", type=int, default=16, help="decoder batch bound (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return 0.0
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _cell(url: str, key: str, model: str, prompts: list[str], clients: int, new_tokens: int, batcher) -> dict:
    import httpx

    todo = list(enumerate(prompts))
    lock = threading.Lock()
    latencies, tokens, errors = [], [], []
    before = batcher.stats()

    def client():
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    _, prompt = todo.pop(0)
                t0 = time.perf_counter()
                r = http.post("/completions", json={"model": model, "prompt": prompt, "max_tokens": new_tokens,
                                                    "temperature": 0, "ignore_eos": True})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                    else:
                        latencies.append(dt)
                        tokens.append(r.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise FedmoeError(f"bench serve: {len(errors)} requests failed, first: {errors[0]}")
    after = batcher.stats()
    steps = after["steps"] - before["steps"]
    rows = after["rows_decoded"] - before["rows_decoded"]
    return {"clients": clients, "requests": len(latencies), "wall_s": round(wall, 3),
            "completion_tokens": sum(tokens), "tokens_per_s": round(sum(tokens) / wall, 2),
            "p50_ms": round(1000 * _percentile(latencies, 0.5), 1), "p95_ms": round(1000 * _percentile(latencies, 0.95), 1),
            "decode_steps": steps, "mean_batch": round(rows / steps, 2) if steps else 0.0,
            "mixed_expert_steps": after["mixed_expert_steps"] - before["mixed_expert_steps"]}


def run(args) -> dict:
    from fedmoe.server.ops.access import new_token
    from fedmoe.server.serving.openai_api import OpenAIServer

    levels = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    if not levels or levels[0] < 1 or args.requests < 1 or args.new_tokens < 1:
        raise FedmoeError("--concurrency needs counts >= 1, --requests and --new-tokens >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            from fedmoe.server.serving.inference import best_gate, load_served_run
            from fedmoe.shared.data import load_mixed_eval
            from fedmoe.shared.runs import read_run_info

            served = load_served_run(args.run, args.device)
            gate = args.gate or best_gate(args.run, list(served.gates))
            suite = read_run_info(Path(args.run)).get("suite")
            prompts = [r.prompt for r in load_mixed_eval(suite)] if suite and Path(suite).is_dir() else \
                [f"A {role} asked what it means. Answer:" for role in ("physician", "judge", "trader", "installer")]
        else:
            from fedmoe.simulations.benchmarks.latency import _synthetic

            gate = args.gate or "prototype"
            served, prompts = _synthetic(Path(tmp), args.seed, [gate], args.device)
        if gate not in served.gates:
            raise FedmoeError(f"gate {gate!r} is not available: this set-up has {', '.join(served.gates)}")
        prompts = (prompts * (1 + args.requests // max(1, len(prompts))))[: args.requests]
        key = new_token()
        server = OpenAIServer(served, gate, "127.0.0.1", 0, [key], max_batch=args.max_batch,
                              max_queue=max(64, 2 * max(levels)))
        try:
            workloads = {"gated": "fedmoe", "one_expert": f"expert/{served.experts[0]}"}
            _cell(server.url, key, "fedmoe", prompts[:2], 1, 2, server.batcher)  # warm-up
            cells = {w: [] for w in workloads}
            for c in levels:  # the workloads take turns at each level: both see the same machine load
                for w, model in workloads.items():
                    cells[w].append(_cell(server.url, key, model, prompts, c, args.new_tokens, server.batcher))
        finally:
            server.stop()
    for rows in cells.values():
        base = rows[0]["tokens_per_s"] or 1.0
        for row in rows:
            row["throughput_vs_one_at_a_time"] = round(row["tokens_per_s"] / base, 2)
    return {"workloads": cells, "gate": gate, "experts": served.experts, "device": str(served.device),
            "requests": args.requests, "new_tokens": args.new_tokens, "max_batch": args.max_batch,
            "one_at_a_time": levels[0] == 1,
            "setup": "run" if args.run else "synthetic (tiny model, random experts)"}


def summary(result: dict) -> str:
    lines = [f"OpenAI API under load: {result['requests']} requests x {result['new_tokens']} max tokens on "
             f"{result['device']} (gate {result['gate']}, max batch {result['max_batch']})",
             f"{'workload':<12}{'C':>4}{'tok/s':>9}{'vs C=1':>8}{'p50 ms':>9}{'p95 ms':>9}{'batch':>7}{'mixed':>7}"]
    for w, rows in result["workloads"].items():
        for r in rows:
            lines.append(f"{w:<12}{r['clients']:>4}{r['tokens_per_s']:>9.1f}{r['throughput_vs_one_at_a_time']:>7.2f}x"
                         f"{r['p50_ms']:>9.0f}{r['p95_ms']:>9.0f}{r['mean_batch']:>7.1f}{r['mixed_expert_steps']:>7}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for w, rows in result["workloads"].items():
        cs = [r["clients"] for r in rows]
        ax1.plot(cs, [r["tokens_per_s"] for r in rows], marker="o", label=w.replace("_", " "))
        ax2.plot(cs, [r["p50_ms"] for r in rows], marker="o", label=f"{w.replace('_', ' ')} p50")
        ax2.plot(cs, [r["p95_ms"] for r in rows], marker="x", linestyle="--", label=f"{w.replace('_', ' ')} p95")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.legend(fontsize=7)
    ax1.set_ylabel("completion tokens/s")
    ax2.set_ylabel("request latency (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
