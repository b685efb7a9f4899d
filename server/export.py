"""Exporting one domain expert of a run for a site: a peft adapter, a merged Hugging Face
model, or an ONNX model (with key/value-cache inputs and outputs) for onnxruntime.

The ONNX graph is the merged model (LoRA folded into the base weights) wrapped so the
cache travels as plain tensors:

    inputs   input_ids [batch, seq], attention_mask [batch, past + seq],
             position_ids [batch, seq] (when the model takes them),
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim]
    outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past + seq, head_dim]

The first step feeds a past of length 0, so one graph serves prefill and decode. Layer
count and cache shapes come from a real forward pass, not from config field names, so
nothing here is specific to one architecture. `fedmoe.shared.edge` runs the result with
onnxruntime and `tokenizers` alone.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from pathlib import Path

from fedmoe.shared.errors import FedmoeError

FORMATS = ("peft", "merged", "onnx")
QUANTIZE = ("int8",)
EXPORTERS = ("dynamo", "torchscript")
EDGE_META = "edge.json"
ONNX_FILE = "model.onnx"
EDGE_FORMAT = "fedmoe-edge-onnx/1"
# Files a site needs to tokenize like the coordinator did; copied when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# Above this many bytes of weights the ONNX weights go to a side file (protobuf's 2 GiB cap).
EXTERNAL_DATA_BYTES = 1 << 30


# ---------------------------------------------------------------- run folder -> expert


def resolve_expert(run_dir: str | Path, name: str) -> tuple[Path, Path, dict]:
    """(base model dir, adapter dir, run info) for expert `name` of a run, checked."""
    from fedmoe.shared.runs import expert_dir, read_run_info

    info = read_run_info(run_dir)
    adapter = expert_dir(run_dir, name)
    base = info.get("model")
    if not base:
        raise FedmoeError(f"run.json in {run_dir} names no base model (key 'model')")
    base = Path(base)
    if not (base / "config.json").is_file():
        raise FedmoeError(f"base model of run {run_dir} not found: {base} (from run.json)")
    return base, adapter, info


def export_expert(run_dir: str | Path, name: str, fmt: str, out: str | Path, quantize: str | None = None,
                  exporter: str = "dynamo") -> dict:
    """`fedmoe export`: write expert `name` of run `run_dir` to `out` in format `fmt`."""
    if fmt not in FORMATS:
        raise FedmoeError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise FedmoeError(f"unknown quantization {quantize!r} for export: choose {', '.join(QUANTIZE)}")
    if quantize and fmt != "onnx":
        raise FedmoeError(f"--quantize {quantize} applies to --format onnx only, not {fmt}")
    if exporter not in EXPORTERS:
        raise FedmoeError(f"unknown ONNX exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    base, adapter, info = resolve_expert(run_dir, name)
    out = Path(out)
    _check_out(out)
    created = not out.exists()
    try:
        return _export(base, adapter, info, name, fmt, run_dir, out, quantize, exporter)
    except BaseException:
        if created:  # no half-written folder left behind to be mistaken for an export
            shutil.rmtree(out, ignore_errors=True)
        raise


def _export(base: Path, adapter: Path, info: dict, name: str, fmt: str, run_dir, out: Path, quantize, exporter) -> dict:
    meta = {"expert": name, "run": str(run_dir), "base_model": str(base), "base_fingerprint": info.get("base_fingerprint")}
    if fmt == "peft":
        shutil.copytree(adapter, out, dirs_exist_ok=True)
        return {"format": "peft", "out": str(out), **meta, "bytes": dir_bytes(out)}
    model, tokenizer = load_merged(base, adapter, info.get("base_fingerprint"))
    if fmt == "merged":
        save_merged(model, tokenizer, base, out)
        return {"format": "merged", "out": str(out), **meta, "bytes": dir_bytes(out)}
    result = export_onnx(model, base, out, quantize=quantize, exporter=exporter, extra_meta=meta)
    return {"format": "onnx", **meta, **result}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FedmoeError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise FedmoeError(f"--out folder {out} is not empty; choose a new folder")


def load_merged(base_dir: str | Path, adapter_dir: str | Path | None, base_fingerprint: str | None = None):
    """The full-precision base on CPU with the adapter folded in (peft merge_and_unload)."""
    from fedmoe.shared.modeling import load_adapter, load_base_model, load_tokenizer, model_fingerprint

    model = load_base_model(base_dir, quant="none", device="cpu")
    if adapter_dir is not None:
        if base_fingerprint and model_fingerprint(base_dir) != base_fingerprint:
            raise FedmoeError(f"base model {base_dir} does not match the run's base_fingerprint {base_fingerprint}")
        model = load_adapter(model, adapter_dir, base_fingerprint=base_fingerprint or model_fingerprint(base_dir))
        model = model.merge_and_unload()
    model.eval()
    return model, load_tokenizer(base_dir)


def save_merged(model, tokenizer, base_dir: str | Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _copy_tokenizer_files(base_dir, out)


def _copy_tokenizer_files(base_dir: str | Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        src = Path(base_dir) / name
        if src.is_file() and not (out / name).is_file():
            shutil.copy2(src, out / name)


def dir_bytes(path: str | Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------- ONNX with KV cache


def _cache_kwarg(model) -> str:
    # transformers 5 renamed `past_key_values` to `cache`; accept both.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_tensors(cache) -> list:
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t for kv in cache for t in kv[:2]]  # legacy tuple-of-tuples


def cache_layout(model) -> dict:
    """Layer count and per-layer cache shapes from one real forward pass."""
    import torch

    with torch.no_grad():
        ids = torch.zeros((1, 2), dtype=torch.long)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    tensors = _cache_tensors(_out_cache(out))
    shapes = [list(t.shape) for t in tensors]
    if not shapes or any(len(s) != 4 or s[2] != 2 for s in shapes):
        raise FedmoeError(f"model type {model.config.model_type!r} has a cache layout the ONNX export does not handle: {shapes[:2]}")
    return {"num_layers": len(shapes) // 2, "kv_shapes": [[s[1], s[3]] for s in shapes], "vocab_size": int(out.logits.shape[-1])}


class _KVCacheWrapper:
    """Builds the flat-tensor-in, flat-tensor-out module the exporter traces."""

    @staticmethod
    def build(model, num_layers: int, with_positions: bool):
        import torch
        from transformers.cache_utils import DynamicCache

        cache_kw = _cache_kwarg(model)

        class KVCacheLM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, *rest):
                if with_positions:
                    position_ids, past = rest[0], rest[1:]
                else:
                    position_ids, past = None, rest
                cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(num_layers)],
                                     config=self.model.config)
                kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, cache_kw: cache, "use_cache": True}
                if with_positions:
                    kwargs["position_ids"] = position_ids
                out = self.model(**kwargs)
                return (out.logits, *_cache_tensors(_out_cache(out)))

        return KVCacheLM().eval()


def onnx_names(num_layers: int, with_positions: bool) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{part}" for i in range(num_layers) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask"] + (["position_ids"] if with_positions else []) + [f"past_key_values.{n}" for n in kv]
    return inputs, ["logits"] + [f"present.{n}" for n in kv]


def export_onnx(model, base_dir: str | Path, out: str | Path, quantize: str | None = None, exporter: str = "dynamo",
                extra_meta: dict | None = None) -> dict:
    """Write `out/model.onnx` (+ tokenizer files and edge.json) from a merged causal LM."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    model.config.use_cache = True
    layout = cache_layout(model)
    n = layout["num_layers"]
    with_positions = "position_ids" in inspect.signature(model.forward).parameters
    wrapper = _KVCacheWrapper.build(model, n, with_positions)
    in_names, out_names = onnx_names(n, with_positions)

    # Trace shapes: batch 2, 3 new tokens after a past of 4 (sizes 0 and 1 would be
    # specialised as constants by the tracer).
    batch, seq, past = 2, 3, 4
    ids = torch.randint(0, layout["vocab_size"], (batch, seq))
    mask = torch.ones((batch, past + seq), dtype=torch.long)
    args = [ids, mask]
    if with_positions:
        args.append(torch.arange(past, past + seq).unsqueeze(0).expand(batch, seq).contiguous())
    args += [torch.randn((batch, h, past, d)) for h, d in layout["kv_shapes"]]

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    with tempfile.TemporaryDirectory(prefix="fedmoe-onnx-") as tmp:
        fp32_path = Path(tmp) / ONNX_FILE if quantize else out / ONNX_FILE
        try:
            _torch_onnx_export(wrapper, tuple(args), fp32_path, in_names, out_names, n, with_positions, exporter, external)
        except FedmoeError:
            raise
        except Exception as exc:  # the exporters raise many types; one line says which step failed
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FedmoeError(f"ONNX export ({exporter}) of model type {model.config.model_type!r} failed: {first[:300]}") from exc
        if quantize == "int8":
            quantize_int8(fp32_path, out / ONNX_FILE, external=external)

    _copy_tokenizer_files(base_dir, out)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = model.config.eos_token_id
    meta = {
        "format": EDGE_FORMAT,
        "model_file": ONNX_FILE,
        "model_type": model.config.model_type,
        "exporter": exporter,
        "quantization": quantize,
        "num_layers": n,
        "kv_shapes": layout["kv_shapes"],
        "vocab_size": layout["vocab_size"],
        "inputs": in_names,
        "outputs": out_names,
        "position_ids": with_positions,
        "eos_token_id": eos if isinstance(eos, list) else ([eos] if eos is not None else []),
        "pad_token_id": model.config.pad_token_id,
        "max_positions": _max_positions(model.config),
        **(extra_meta or {}),
    }
    (out / EDGE_META).write_text(json.dumps(meta, indent=2, default=str))
    return {"out": str(out), "model_file": str(out / ONNX_FILE), "quantization": quantize, "exporter": exporter,
            "bytes": dir_bytes(out), "onnx_bytes": onnx_bytes(out / ONNX_FILE)}


def _max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def onnx_bytes(path: str | Path) -> int:
    """Size of an ONNX model on disk, with its external-data side file if any."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())


def _torch_onnx_export(wrapper, args, path: Path, in_names, out_names, n: int, with_positions: bool, exporter: str,
                       external: bool) -> None:
    import logging
    import warnings

    import torch

    n_fixed = 3 if with_positions else 2
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed" and similar notices
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            _run_exporter(wrapper, args, path, in_names, out_names, n, with_positions, exporter, external, n_fixed)
        finally:
            onnx_log.setLevel(level)


def _run_exporter(wrapper, args, path, in_names, out_names, n, with_positions, exporter, external, n_fixed) -> None:
    import torch

    if exporter == "dynamo":
        from torch.export import Dim

        batch, seq, past, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total}}
        if with_positions:
            shapes["position_ids"] = {0: batch, 1: seq}
        # torch.export sees the wrapper's varargs (positions, cache) as one tuple.
        rest = ([shapes["position_ids"]] if with_positions else []) + [{0: batch, 2: past}] * (2 * n)
        dynamic_shapes = (shapes["input_ids"], shapes["attention_mask"], tuple(rest))
        program = torch.onnx.export(wrapper, args, input_names=in_names, output_names=out_names,
                                    dynamic_shapes=dynamic_shapes, dynamo=True, verbose=False)
        program.save(str(path), external_data=external)
    else:
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                "logits": {0: "batch", 1: "seq"}}
        if with_positions:
            axes["position_ids"] = {0: "batch", 1: "seq"}
        for name in in_names[n_fixed:]:
            axes[name] = {0: "batch", 2: "past"}
        for name in out_names[1:]:
            axes[name] = {0: "batch", 2: "total"}
        torch.onnx.export(wrapper, args, str(path), input_names=in_names, output_names=out_names,
                          dynamic_axes=axes, dynamo=False, opset_version=18)


def quantize_int8(src: str | Path, dst: str | Path, external: bool = False) -> None:
    """Dynamic int8 weight quantization with onnxruntime's own tools.

    onnxruntime's pre-processing (shape inference + graph optimisation) runs first, as
    its quantization guide asks; it fuses enough that the int8 graph also runs faster.
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="fedmoe-quant-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        try:
            quant_pre_process(str(src), str(pre), save_as_external_data=external)
        except Exception as exc:  # pre-processing is an optimisation; quantize the raw graph instead
            logging.getLogger(__name__).info("onnxruntime quantization pre-processing skipped: %s", exc)
            pre = Path(src)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger
        try:
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             use_external_data_format=external)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FedmoeError(f"int8 quantization of {src} failed: {first[:300]}") from exc
        finally:
            root.setLevel(level)


def quantize_edge_dir(src: str | Path, dst: str | Path) -> dict:
    """An int8 copy of an fp32 edge folder (same tokenizer and metadata), without re-exporting."""
    src, dst = Path(src), Path(dst)
    meta = json.loads((src / EDGE_META).read_text())
    if meta.get("quantization"):
        raise FedmoeError(f"{src} is already quantized ({meta['quantization']})")
    _check_out(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model_file = src / meta["model_file"]
    for p in src.iterdir():
        if p.is_file() and not p.name.startswith(model_file.name) and p.name != EDGE_META:
            shutil.copy2(p, dst / p.name)
    quantize_int8(model_file, dst / ONNX_FILE, external=(src / (model_file.name + ".data")).exists())
    meta.update(quantization="int8", model_file=ONNX_FILE)
    (dst / EDGE_META).write_text(json.dumps(meta, indent=2, default=str))
    return {"out": str(dst), "bytes": dir_bytes(dst), "onnx_bytes": onnx_bytes(dst / ONNX_FILE)}
