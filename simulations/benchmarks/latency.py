"""`fedmoe bench latency`: per-request latency of gated top-1 inference vs one LoRA.

Both run on the same loaded model in the same process, request by request in
alternation (so both see the same machine load): "single LoRA" is the base with one
expert active (a plain peft forward, no routing); "gated" is the gate's routing pass
plus generation with peft's mixed-batch `adapter_names`. Reported: the medians and
their ratio, for each gate asked for.

    fedmoe bench latency --run OUT            # a finished run's experts and gates
    fedmoe bench latency                       # the tiny model, 4 random experts, a fresh suite
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fedmoe.shared.errors import FedmoeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="run folder with experts/ (and gates/); default: a synthetic set-up on the tiny model")
    p.add_argument("--gates", default="prototype,arrow", help="comma-separated gates (default prototype,arrow)")
    p.add_argument("--requests", type=int, default=32, help="timed requests per side (default 32)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per request (default 8)")
    p.add_argument("--repeats", type=int, default=1, help="passes over the requests (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def _synthetic(tmp: Path, seed: int, gates: list[str], device):
    """Tiny base, a fresh 4-domain suite, and one random-weight expert per domain:
    latency does not depend on what the experts learned."""
    import torch

    from fedmoe.simulations.moe_report import build_gates
    from fedmoe.server.moe.served_model import ServedModel
    from fedmoe.shared.data import find_sites, load_mixed_eval, load_site
    from fedmoe.shared.modeling import attach_lora, load_base_model, model_fingerprint, save_adapter
    from fedmoe.shared.pretrain import ensure_default_model
    from fedmoe.simulations.domain_suite import make_suite

    model_dir = ensure_default_model()
    make_suite(tmp / "suite", domains=4, sites=4, seed=seed)
    sites = [load_site(p) for p in find_sites(tmp / "suite")]
    fp = model_fingerprint(model_dir)
    experts = {}
    for i, domain in enumerate(sorted({s.domain for s in sites})):
        torch.manual_seed(seed * 100 + i)
        model = attach_lora(load_base_model(model_dir, "none", "cpu"), rank=8)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        experts[domain] = save_adapter(model, tmp / "experts" / domain, fp, domain=domain)
    served = ServedModel(model_dir, experts, device)
    build_gates(served, sites, seed, tuple(gates), router_rounds=2, router_local_steps=2)
    return served, [r.prompt for r in load_mixed_eval(tmp / "suite")]


def run(args) -> dict:
    from fedmoe.simulations.moe_report import measure_latency

    gates = [g.strip() for g in args.gates.split(",") if g.strip()]
    if args.requests < 1 or args.new_tokens < 1:
        raise FedmoeError("--requests and --new-tokens must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            from fedmoe.server.serving.inference import load_served_run
            from fedmoe.shared.data import find_sites

            served = load_served_run(args.run, args.device)
            missing = [g for g in gates if g not in served.gates]
            if missing:
                raise FedmoeError(f"run {args.run} has no saved gate {missing[0]!r} (it has {', '.join(served.gates)})")
            prompts = [f"A {role} asked what it means. Answer:" for role in ("physician", "judge", "trader", "installer")]
            prompts = (prompts * args.requests)[: args.requests]
        else:
            served, prompts = _synthetic(Path(tmp), args.seed, gates, args.device)
        prompts = (prompts * (1 + args.requests // max(1, len(prompts))))[: args.requests]
        results = {g: measure_latency(served, g, prompts, args.new_tokens, args.repeats) for g in gates}
    return {"gates": results, "experts": served.experts, "device": str(served.device), "requests": args.requests,
            "new_tokens": args.new_tokens, "setup": "run" if args.run else "synthetic (tiny model, random experts)"}


def summary(result: dict) -> str:
    lines = [f"per-request latency, {result['requests']} requests x {result['new_tokens']} new tokens on {result['device']}",
             f"{'gate':<12}{'gated ms':>10}{'1-LoRA ms':>11}{'ratio':>8}"]
    for g, r in result["gates"].items():
        lines.append(f"{g:<12}{r['gated_ms']:>10.1f}{r['single_lora_ms']:>11.1f}{r['latency_ratio']:>8.2f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gates = list(result["gates"])
    fig, ax = plt.subplots(figsize=(5, 3))
    xs = range(len(gates))
    ax.bar([x - 0.2 for x in xs], [result["gates"][g]["single_lora_ms"] for g in gates], 0.4, label="single LoRA")
    ax.bar([x + 0.2 for x in xs], [result["gates"][g]["gated_ms"] for g in gates], 0.4, label="gated top-1")
    for x, g in zip(xs, gates):
        ax.text(x + 0.2, result["gates"][g]["gated_ms"], f"{result['gates'][g]['latency_ratio']:.2f}x", ha="center", va="bottom")
    ax.set_xticks(list(xs), gates)
    ax.set_ylabel("median ms per request")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
