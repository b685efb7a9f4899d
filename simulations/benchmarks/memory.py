"""`fedmoe bench memory`: peak memory and tokens/s of local LoRA training, nf4 vs none.

One run builds a Llama model with random weights (about 115M parameters by default,
saved in bfloat16 like a real checkpoint, with the tiny model's tokenizer), then trains
a LoRA adapter on it for a few steps once per quantization mode, each in a fresh
subprocess so that every mode's peak resident memory (Linux VmHWM) is its own. The
result is the two modes side by side and their ratios, measured in the same run.

    fedmoe bench memory                      # ~115M parameters, defaults below
    fedmoe bench memory --params-m 300 --steps 5 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fedmoe.shared.errors import FedmoeError

MODES = ("none", "nf4")  # `none` first: the baseline the ratios divide by


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params-m", type=float, default=115, help="model size in millions of parameters (default 115)")
    p.add_argument("--steps", type=int, default=3, help="measured training steps per mode (default 3)")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed steps before measuring (default 1)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per training sequence (default 32)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def size_config(params_m: float, vocab_size: int) -> dict:
    """Llama shape whose parameter count is close to `params_m` million: the widest
    hidden size (from a ladder) that still gives at least two layers."""
    target = params_m * 1e6
    if target <= 0:
        raise FedmoeError(f"--params-m must be positive, got {params_m}")
    for hidden in (1024, 768, 512, 384, 256, 128, 64):
        inter = -(-(8 * hidden // 3) // 64) * 64
        per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
        layers = round((target - vocab_size * hidden) / per_layer)
        if layers >= 2 or hidden == 64:
            heads = max(1, hidden // 64)
            return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": max(1, layers),
                    "num_attention_heads": heads, "num_key_value_heads": heads}
    raise AssertionError("unreachable")


def build_random_model(out: Path, params_m: float, seq_len: int) -> dict:
    """A random-weight Llama checkpoint (bf16 on disk) with the tiny model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedmoe.shared.modeling import load_tokenizer
    from fedmoe.shared.pretrain import ensure_default_model

    tok_dir = ensure_default_model()
    tokenizer = load_tokenizer(tok_dir)
    shape = size_config(params_m, len(tokenizer))
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max(128, seq_len), tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    del model
    tokenizer.save_pretrained(out)
    return {"parameters": parameters, "dtype_on_disk": "bfloat16", **shape}


def training_records(tokenizer, n: int, seq_len: int):
    """`n` text records of at least `seq_len` tokens (truncated to it when training)."""
    from fedmoe.shared.data import Record
    from fedmoe.shared.pretrain import general_corpus

    sentences = general_corpus(max(64, 8 * n), seed=0)
    records, text = [], ""
    for s in sentences:
        text = f"{text} {s}".strip()
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= seq_len:
            records.append(Record("", text))
            text = ""
            if len(records) == n:
                break
    if len(records) < n:
        raise FedmoeError(f"could not build {n} training sequences of {seq_len} tokens")
    return records


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB.

    Linux's VmHWM is per address space, so it starts afresh at exec; `ru_maxrss` does
    not (a child inherits its parent's peak across fork+exec), so it is only the
    fallback where /proc is missing."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)
        return peak, peak


def reset_peak_rss() -> bool:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(model_dir: str, quant: str, steps: int, warmup: int, seq_len: int, batch_size: int, rank: int, device: str) -> dict:
    """One mode, run in its own process: load, attach LoRA, train; report peak memory."""
    import time

    import torch

    from fedmoe.client.trainer import SiteTrainer
    from fedmoe.shared.training import TrainConfig

    import bitsandbytes  # noqa: F401  (imported before the baseline, so it counts as import cost)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    cuda = torch.cuda.is_available() and device != "cpu"
    baseline_mb, _ = rss_mb()
    start = time.perf_counter()
    trainer = SiteTrainer(model_dir, quant=quant, rank=rank, device=device)
    load_seconds = time.perf_counter() - start
    base = trainer.model.get_base_model()
    weight_bytes = int(base.get_memory_footprint())
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    records = training_records(trainer.tokenizer, batch_size * (steps + warmup), seq_len)
    import gc

    gc.collect()
    _, load_peak_mb = rss_mb()
    train_peak_separate = reset_peak_rss()
    if warmup:
        trainer.train(records, TrainConfig(steps=warmup, batch_size=batch_size, max_length=seq_len, seed=1))
    if cuda:
        torch.cuda.synchronize()
    _, result = trainer.train(records, TrainConfig(steps=steps, batch_size=batch_size, max_length=seq_len, seed=0))
    if cuda:
        torch.cuda.synchronize()
    _, train_peak_mb = rss_mb()
    peak_mb = max(train_peak_mb, load_peak_mb)
    return {
        "quant": quant,
        "device": str(next(trainer.model.parameters()).device),
        "peak_rss_mb": peak_mb,
        "baseline_rss_mb": baseline_mb,
        "peak_rss_above_baseline_mb": peak_mb - baseline_mb,
        # The load peak (reading + quantizing weights) and the training peak, apart.
        "load_peak_rss_mb": load_peak_mb,
        "train_peak_rss_mb": train_peak_mb if train_peak_separate else None,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "weight_bytes": weight_bytes,
        "trainable_parameters": trainable,
        "load_seconds": load_seconds,
        "train_seconds": result.seconds,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
        "final_loss": result.final_loss,
    }


def in_subprocess(job: str, **kwargs) -> dict:
    """Run `job` (build | train) in a fresh interpreter; its last stdout line is JSON."""
    cmd = [sys.executable, "-m", "fedmoe.simulations.benchmarks.memory", "--child", json.dumps({"job": job, **kwargs})]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        what = job if "quant" not in kwargs else f"{job} {kwargs['quant']}"
        raise FedmoeError(f"memory benchmark ({what}) failed: {tail[-1] if tail else f'exit code {proc.returncode}'}")
    return json.loads(lines[-1])


def ratio(a, b):
    return a / b if a is not None and b else None


def run(args) -> dict:
    if args.steps < 1 or args.batch_size < 1 or args.seq_len < 8:
        raise FedmoeError("--steps and --batch-size must be >= 1 and --seq-len >= 8")
    with tempfile.TemporaryDirectory(prefix="fedmoe-bench-memory-") as tmp:
        model_dir = Path(tmp) / "model"
        # Built in a subprocess too, so this process stays small while the modes run.
        model = in_subprocess("build", out=str(model_dir), params_m=args.params_m, seq_len=args.seq_len)
        modes = {quant: in_subprocess("train", model_dir=str(model_dir), quant=quant, steps=args.steps, warmup=args.warmup_steps,
                                      seq_len=args.seq_len, batch_size=args.batch_size, rank=args.rank, device=args.device)
                 for quant in MODES}
        shutil.rmtree(model_dir, ignore_errors=True)
    nf4, none = modes["nf4"], modes["none"]
    return {
        "benchmark": "memory",
        "model": model,
        "settings": {"steps": args.steps, "warmup_steps": args.warmup_steps, "seq_len": args.seq_len,
                     "batch_size": args.batch_size, "rank": args.rank, "device": args.device,
                     "cpu_threads": os.cpu_count()},
        "modes": modes,
        "ratios": {
            "peak_rss_nf4_over_none": ratio(nf4["peak_rss_mb"], none["peak_rss_mb"]),
            "peak_rss_above_baseline_nf4_over_none": ratio(nf4["peak_rss_above_baseline_mb"], none["peak_rss_above_baseline_mb"]),
            "load_peak_rss_nf4_over_none": ratio(nf4["load_peak_rss_mb"], none["load_peak_rss_mb"]),
            "train_peak_rss_nf4_over_none": ratio(nf4["train_peak_rss_mb"], none["train_peak_rss_mb"]),
            "cuda_peak_nf4_over_none": ratio(nf4["cuda_peak_mb"], none["cuda_peak_mb"]),
            "weight_bytes_nf4_over_none": ratio(nf4["weight_bytes"], none["weight_bytes"]),
            "tokens_per_second_nf4_over_none": ratio(nf4["tokens_per_second"], none["tokens_per_second"]),
        },
    }


def summary(result: dict) -> str:
    m = result["model"]
    rows = [
        ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
        ("peak RSS above imports (MB)", "peak_rss_above_baseline_mb", "{:.0f}"),
        ("  while loading (MB)", "load_peak_rss_mb", "{:.0f}"),
        ("  while training (MB)", "train_peak_rss_mb", "{:.0f}"),
        ("CUDA peak allocated (MB)", "cuda_peak_mb", "{:.0f}"),
        ("model weights (MB)", "weight_bytes", "{:.1f}"),
        ("training tokens/s", "tokens_per_second", "{:.1f}"),
    ]
    ratios = {"peak_rss_mb": "peak_rss_nf4_over_none", "peak_rss_above_baseline_mb": "peak_rss_above_baseline_nf4_over_none",
              "load_peak_rss_mb": "load_peak_rss_nf4_over_none", "train_peak_rss_mb": "train_peak_rss_nf4_over_none",
              "cuda_peak_mb": "cuda_peak_nf4_over_none", "weight_bytes": "weight_bytes_nf4_over_none",
              "tokens_per_second": "tokens_per_second_nf4_over_none"}
    s = result["settings"]
    out = [f"LoRA training memory, {m['parameters'] / 1e6:.0f}M-parameter Llama (random weights), rank {s['rank']}, "
           f"{s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens",
           f"{'':<30}{'none':>10}{'nf4':>10}{'nf4/none':>10}"]
    for label, key, fmt in rows:
        vals = [result["modes"][q][key] for q in ("none", "nf4")]
        if vals[0] is None:
            continue
        if key == "weight_bytes":
            vals = [v / 2**20 for v in vals]
        r = result["ratios"][ratios[key]]
        out.append(f"{label:<30}{fmt.format(vals[0]):>10}{fmt.format(vals[1]):>10}{r:>10.2f}")
    return "\n".join(out)


def plot(result: dict, png_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("peak RSS (MB)", lambda m: m["peak_rss_mb"]), ("model weights (MB)", lambda m: m["weight_bytes"] / 2**20),
              ("training tokens/s", lambda m: m["tokens_per_second"])]
    if result["modes"]["none"].get("cuda_peak_mb") is not None:
        panels.insert(1, ("CUDA peak allocated (MB)", lambda m: m["cuda_peak_mb"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2))
    for ax, (title, get) in zip(axes, panels):
        vals = [get(result["modes"][q]) for q in MODES]
        bars = ax.bar(MODES, vals, color=["#888888", "#2a7ab9"])
        ax.bar_label(bars, fmt="%.3g")
        ax.margins(y=0.15)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"LoRA training, {result['model']['parameters'] / 1e6:.0f}M-parameter model: nf4 vs none", fontsize=11)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def child_main(spec: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    kwargs = json.loads(spec)
    job = kwargs.pop("job")
    if job == "build":
        result = build_random_model(Path(kwargs["out"]), kwargs["params_m"], kwargs["seq_len"])
    else:
        result = child(**kwargs)
    print(json.dumps(result))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    child_main(sys.argv[2])
