"""`fedmoe bench step-time`: seconds per local LoRA training step on a real model, per
quantization mode, side by side in one run.

What a site pays per round is local_steps x this number, so it decides which base
precision a preset gives its sites. Each mode loads the same model folder (by default
SmolLM2-135M, fetched on first use), attaches the same LoRA, trains `--warmup-steps`
untimed steps and then `--steps` timed ones on the same domain-suite records (the
prompt/completion records `fedmoe simulate` trains on). Per-step times come from the
trainer's own step callback; the median is reported (the first steps of a mode can
still be warming caches).

    fedmoe bench step-time                       # smollm2-135m, nf4 vs none, 5 steps each
    fedmoe bench step-time --model DIR --steps 3 --quant nf4,int8,none
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from fedmoe.shared.errors import FedmoeError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model folder or fetchable name (default smollm2-135m)")
    p.add_argument("--quant", default="nf4,none", help="modes to compare, comma-separated (default nf4,none; the last is "
                                                       "the baseline the ratios divide by)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per mode (default 5)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps before timing (default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="records per step (default 16, the presets')")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def suite_records(n: int):
    """Training records of the smoke preset's suite (generated once, cached)."""
    from fedmoe.shared.data import find_sites, load_site
    from fedmoe.simulations.presets import PRESETS
    from fedmoe.simulations.simulate import prepare_suite

    records = [r for p in find_sites(prepare_suite(PRESETS["smoke"], None)) for r in load_site(p).train]
    return records[: max(n, 1)]


def time_mode(model_dir, quant: str, records, args) -> dict:
    import torch

    from fedmoe.client.trainer import SiteTrainer
    from fedmoe.shared.training import TrainConfig

    start = time.perf_counter()
    trainer = SiteTrainer(model_dir, quant=quant, rank=args.rank, device=args.device)
    load_seconds = time.perf_counter() - start
    cuda = next(trainer.model.parameters()).device.type == "cuda"
    stamps: list[float] = []

    def tick(step, loss):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    cfg = TrainConfig(steps=args.warmup_steps + args.steps, batch_size=args.batch_size, seed=0)
    first = time.perf_counter()
    _, result = trainer.train(records, cfg, progress=tick)
    times = [b - a for a, b in zip([first] + stamps, stamps)][args.warmup_steps:]
    out = {
        "quant": quant,
        "device": str(next(trainer.model.parameters()).device),
        "load_seconds": load_seconds,
        "step_seconds": times,
        "median_step_seconds": statistics.median(times),
        "mean_step_seconds": statistics.fmean(times),
        "weight_bytes": int(trainer.model.get_base_model().get_memory_footprint()),
        "tokens_per_step": result.tokens / cfg.steps,
        "final_loss": result.final_loss,
    }
    del trainer
    return out


def run(args) -> dict:
    import torch

    from fedmoe.shared.commands import resolve_model_dir
    from fedmoe.shared.modeling import QUANT_MODES, check_model_dir

    modes = [q.strip() for q in args.quant.split(",") if q.strip()]
    bad = [q for q in modes if q not in QUANT_MODES]
    if bad or len(modes) < 2:
        raise FedmoeError(f"--quant needs at least two of {', '.join(QUANT_MODES)}, comma-separated; got {args.quant!r}")
    if args.steps < 1 or args.warmup_steps < 0 or args.batch_size < 1:
        raise FedmoeError("--steps and --batch-size must be >= 1 and --warmup-steps >= 0")
    model_dir = check_model_dir(resolve_model_dir(args.model))
    records = suite_records(args.batch_size * (args.steps + args.warmup_steps))
    results = {q: time_mode(model_dir, q, records, args) for q in modes}
    base = modes[-1]
    import json

    config = json.loads((model_dir / "config.json").read_text())
    return {
        "benchmark": "step-time",
        "model": {"path": str(model_dir), "model_type": config.get("model_type"),
                  "architecture": (config.get("architectures") or [None])[0]},
        "settings": {"steps": args.steps, "warmup_steps": args.warmup_steps, "batch_size": args.batch_size,
                     "rank": args.rank, "device": args.device, "cpu_threads": torch.get_num_threads(),
                     "cpus": os.cpu_count()},
        "modes": results,
        "baseline": base,
        "ratios": {f"step_seconds_{q}_over_{base}": results[q]["median_step_seconds"] / results[base]["median_step_seconds"]
                   for q in modes if q != base},
    }


def summary(result: dict) -> str:
    base = result["baseline"]
    s = result["settings"]
    parts = [f"{q} {m['median_step_seconds']:.2f}s" for q, m in result["modes"].items()]
    ratios = ", ".join(f"{k.split('_')[2]}/{base} {v:.2f}x" for k, v in result["ratios"].items())
    device = next(iter(result["modes"].values()))["device"]
    return (f"step time ({result['model']['architecture']}, rank {s['rank']}, batch {s['batch_size']}, {device}, "
            f"median of {s['steps']}): {', '.join(parts)}; {ratios}")
