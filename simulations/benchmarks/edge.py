"""`fedmoe bench edge`: onnxruntime (fp32 and int8) against torch eager on CPU.

One process, one model, one prompt, the same number of new tokens (greedy, no early
stop) for every engine; the engines take turns repeat by repeat so a change in machine
load hits them all alike. Torch eager runs twice: through `generate()` (what people
call) and as a bare loop over the KV cache (the same loop the edge runtime runs), and
the ratios are taken against the faster of the two.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

ENGINES = ("torch_generate", "torch_loop", "onnx_fp32", "onnx_int8")


def add_arguments(p) -> None:
    p.add_argument("--model", help="base model directory (default: the built-in tiny model)")
    p.add_argument("--run", help="run folder: benchmark one of its experts (merged into the base) instead")
    p.add_argument("--expert", help="expert name in --run (default: the first)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for every engine (default 1)")
    p.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))


def _median(xs):
    return statistics.median(xs) if xs else None


def run(args) -> dict:
    import numpy as np
    import torch

    from fedmoe.shared.edge import EdgeModel
    from fedmoe.server.export import dir_bytes, export_onnx, load_merged, onnx_bytes, quantize_edge_dir, resolve_expert
    from fedmoe.shared.errors import FedmoeError
    from fedmoe.shared.runs import list_experts

    torch.set_num_threads(args.threads)
    adapter = fingerprint = None
    if args.run:
        expert = args.expert or next(iter(list_experts(args.run)), None)
        if expert is None:
            raise FedmoeError(f"run {args.run} has no experts to benchmark")
        base, adapter, info = resolve_expert(args.run, expert)
        fingerprint = info.get("base_fingerprint")
    else:
        from fedmoe.shared.pretrain import ensure_default_model

        base, expert = Path(args.model) if args.model else ensure_default_model(), None
    model, _ = load_merged(base, adapter, fingerprint)
    model.config.use_cache = True

    with tempfile.TemporaryDirectory(prefix="fedmoe-bench-edge-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        export_onnx(model, base, tmp / "fp32", exporter=args.exporter)
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        quantize_edge_dir(tmp / "fp32", tmp / "int8")
        quantize_s = time.perf_counter() - t0
        model.save_pretrained(str(tmp / "torch"))
        sizes = {
            "torch_safetensors": dir_bytes(tmp / "torch"),
            "onnx_fp32": onnx_bytes(tmp / "fp32" / "model.onnx"),
            "onnx_int8": onnx_bytes(tmp / "int8" / "model.onnx"),
        }
        edge = {name: EdgeModel(tmp / name, threads=args.threads) for name in ("fp32", "int8")}

        vocab = edge["fp32"].meta["vocab_size"]
        max_pos = edge["fp32"].max_positions
        new_tokens = args.new_tokens
        if max_pos and args.prompt_tokens + new_tokens > max_pos:
            new_tokens = max_pos - args.prompt_tokens
            if new_tokens < 2:
                raise FedmoeError(f"--prompt-tokens {args.prompt_tokens} leaves no room in this model's {max_pos} positions")
        special = set(edge["fp32"].eos) | {edge["fp32"].meta.get("pad_token_id")}
        rng = np.random.default_rng(0)
        prompt = [int(t) for t in rng.integers(3, vocab, size=args.prompt_tokens * 2) if int(t) not in special][: args.prompt_tokens]

        runners = {
            "torch_generate": lambda: _torch_generate(model, prompt, new_tokens),
            "torch_loop": lambda: _torch_loop(model, prompt, new_tokens),
            "onnx_fp32": lambda: _edge(edge["fp32"], prompt, new_tokens),
            "onnx_int8": lambda: _edge(edge["int8"], prompt, new_tokens),
        }
        samples = {name: [] for name in ENGINES}
        tokens = {}
        for name in ENGINES:  # warm-up (allocations, onnxruntime's first-run planning)
            tokens[name] = runners[name]()[2]
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name in ENGINES:
                first, total, _ = runners[name]()
                samples[name].append((first, total))
        load_after = os.getloadavg()[0]

    engines = {}
    for name in ENGINES:
        firsts = [f for f, _ in samples[name]]
        totals = [t for _, t in samples[name]]
        decode = [(new_tokens - 1) / (t - f) for f, t in samples[name] if t > f]
        engines[name] = {
            "tokens_per_s": new_tokens / _median(totals),
            "decode_tokens_per_s": _median(decode),
            "first_token_ms": 1000 * _median(firsts),
            # Best of the repeats: the run least disturbed by other work on the machine.
            "best_tokens_per_s": new_tokens / min(totals),
            "best_first_token_ms": 1000 * min(firsts),
            "same_tokens_as_torch": tokens[name] == tokens["torch_loop"],
        }
    engines["torch_generate"]["size_bytes"] = engines["torch_loop"]["size_bytes"] = sizes["torch_safetensors"]
    engines["onnx_fp32"]["size_bytes"] = sizes["onnx_fp32"]
    engines["onnx_int8"]["size_bytes"] = sizes["onnx_int8"]
    best_torch = max(("torch_generate", "torch_loop"), key=lambda n: engines[n]["tokens_per_s"])
    ratios = {}
    for name in ("onnx_fp32", "onnx_int8"):
        ratios[f"{name}_vs_torch_tokens_per_s"] = engines[name]["tokens_per_s"] / engines[best_torch]["tokens_per_s"]
        ratios[f"{name}_vs_torch_generate_tokens_per_s"] = engines[name]["tokens_per_s"] / engines["torch_generate"]["tokens_per_s"]
        ratios[f"{name}_vs_torch_first_token_speedup"] = engines[best_torch]["first_token_ms"] / engines[name]["first_token_ms"]
        ratios[f"{name}_vs_torch_best_tokens_per_s"] = engines[name]["best_tokens_per_s"] / max(
            engines[n]["best_tokens_per_s"] for n in ("torch_generate", "torch_loop"))
        ratios[f"{name}_vs_torch_size"] = engines[name]["size_bytes"] / sizes["torch_safetensors"]
    return {
        "benchmark": "edge",
        "model": str(base),
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "expert": expert,
        "exporter": args.exporter,
        "threads": args.threads,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "repeats": args.repeats,
        "export_s": export_s,
        "quantize_s": quantize_s,
        "load_average": [load_before, load_after],
        "cpu_count": os.cpu_count(),
        "versions": _versions(),
        "torch_baseline": best_torch,
        "engines": engines,
        "ratios": ratios,
        "meets_1_5x": ratios["onnx_fp32_vs_torch_tokens_per_s"] >= 1.5,
    }


def _versions() -> dict:
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__}


def _edge(model, prompt, new_tokens):
    g = model.generate_ids(prompt, max_new_tokens=new_tokens, stop_at_eos=False)
    return g.first_token_s, g.total_s, g.token_ids


class _FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives."""

    def __init__(self, start: float):
        self.start, self.first, self.calls = start, None, 0

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:  # call 1 is the prompt itself
            self.first = time.perf_counter() - self.start

    def end(self):
        pass


def _torch_generate(model, prompt, new_tokens):
    import torch

    ids = torch.tensor([prompt])
    # No end-of-sequence stop, so every engine makes exactly `new_tokens` tokens
    # (min_new_tokens would instead mask EOS out of the logits and change the tokens).
    with torch.inference_mode():
        start = time.perf_counter()
        clock = _FirstTokenClock(start)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, use_cache=True, streamer=clock, eos_token_id=None,
                             pad_token_id=model.config.pad_token_id)
        total = time.perf_counter() - start
    return clock.first, total, out[0, len(prompt):].tolist()


def _torch_loop(model, prompt, new_tokens):
    import torch
    from transformers.cache_utils import DynamicCache

    from fedmoe.server.export import _cache_kwarg, _out_cache

    cache_kw = _cache_kwarg(model)
    with torch.inference_mode():
        start = time.perf_counter()
        ids = torch.tensor([prompt])
        cache = DynamicCache(config=model.config)
        n = len(prompt)
        toks, first = [], 0.0
        for step in range(new_tokens):
            out = model(input_ids=ids, attention_mask=torch.ones((1, n), dtype=torch.long), use_cache=True, **{cache_kw: cache})
            cache = _out_cache(out)
            tok = int(out.logits[0, -1].argmax())
            if step == 0:
                first = time.perf_counter() - start
            toks.append(tok)
            ids = torch.tensor([[tok]])
            n += 1
        total = time.perf_counter() - start
    return first, total, toks


def summary(result: dict) -> str:
    lines = [f"edge benchmark: {result['model_type']} ({result['parameters'] / 1e6:.1f}M params), "
             f"{result['prompt_tokens']} prompt + {result['new_tokens']} new tokens, {result['threads']} thread(s), "
             f"median of {result['repeats']}",
             f"{'engine':<16}{'tokens/s':>10}{'decode tok/s':>14}{'first ms':>10}{'size MB':>9}  same tokens"]
    for name, e in result["engines"].items():
        lines.append(f"{name:<16}{e['tokens_per_s']:>10.1f}{e['decode_tokens_per_s']:>14.1f}{e['first_token_ms']:>10.2f}"
                     f"{e['size_bytes'] / 1e6:>9.2f}  {e['same_tokens_as_torch']}")
    r = result["ratios"]
    lines.append(f"onnxruntime vs torch eager ({result['torch_baseline']}): fp32 {r['onnx_fp32_vs_torch_tokens_per_s']:.2f}x, "
                 f"int8 {r['onnx_int8_vs_torch_tokens_per_s']:.2f}x tokens/s (best-of-{result['repeats']}: "
                 f"{r['onnx_fp32_vs_torch_best_tokens_per_s']:.2f}x, {r['onnx_int8_vs_torch_best_tokens_per_s']:.2f}x); "
                 f"int8 size {r['onnx_int8_vs_torch_size']:.2f}x of torch")
    la = result["load_average"]
    lines.append(f"1-minute load average {la[0]:.1f} -> {la[1]:.1f} on {result['cpu_count']} CPUs")
    return "\n".join(lines)


def plot(result: dict, png_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["engines"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, label in zip(axes, ("tokens_per_s", "first_token_ms", "size_bytes"), ("tokens/s", "first token (ms)", "size (bytes)")):
        ax.bar(names, [result["engines"][n][key] for n in names], color=["#888", "#aaa", "#3a7", "#37a"])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(f"edge: {result['model_type']}, {result['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
