"""Loading any local Hugging Face causal LM, quantized or not, and attaching LoRA.

Sites load the base in 4-bit NF4 through bitsandbytes (which runs on CPU since 0.46);
the coordinator loads it in full precision. Both check they hold the same base with
`model_fingerprint`, a hash of the config and the weight files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from fedmoe.shared.errors import FedmoeError

QUANT_MODES = ("nf4", "int8", "none")

def pick_device(device: str | None = None) -> torch.device:
    """`auto` (or None) means CUDA when present, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FedmoeError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return torch.device(device)


def check_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FedmoeError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise FedmoeError(f"not a Hugging Face model directory (no config.json): {path}")
    return path


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(check_model_dir(path)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(quant: str):
    from transformers import BitsAndBytesConfig

    if quant not in QUANT_MODES:
        raise FedmoeError(f"unknown quantization {quant!r}: choose one of {', '.join(QUANT_MODES)}")
    if quant == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        )
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base_model(path: str | os.PathLike, quant: str = "none", device: str | None = None):
    """Load a causal LM from a local directory; `quant` is nf4, int8 or none."""
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path)
    qcfg = quantization_config(quant)
    dev = pick_device(device)
    kwargs: dict = {"dtype": torch.float32}
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise FedmoeError(f"could not load model from {path}: {str(exc).splitlines()[0]}") from exc
    if qcfg is None:
        model.to(dev)
    elif dev.type == "cpu":
        same_numerics_in_eval(model)
    model.config.use_cache = False
    return model


def same_numerics_in_eval(model) -> int:
    """On CPUs with AVX512-BF16, bitsandbytes' Linear4bit switches in eval mode to a fused
    kernel that casts activations to bfloat16 (its training path dequantizes to fp32). Then
    evaluation disagrees with training and with the same run on another CPU: measured here,
    left- vs right-padded logits differed by more than 1e-5 and a site's exact match fell
    from >= 0.3 to 0.125. Keep the fp32 path everywhere; returns the layers changed."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def default_target_modules(model) -> list[str]:
    """LoRA targets read off the architecture: the leaf name of every linear layer inside
    the repeated blocks (attention and MLP projections; facts live in the MLP as much as
    in attention), in the order the model first holds them.

    Llama/Qwen2/Gemma give q,k,v,o,gate,up,down_proj; GPT-2 c_attn, c_proj, c_fc. Layers
    outside the blocks (lm_head, classifier heads) stay frozen: they are not per-block
    and, tied to the embeddings, would make every adapter vocabulary-sized."""
    from transformers.pytorch_utils import Conv1D

    names: list[str] = []
    for name, module in model.named_modules():
        # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear, so quantized models read the same.
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or "lora_" in name:
            continue
        parts = name.removesuffix(".base_layer").split(".")  # peft wraps the layer it adapts
        if any(p.isdigit() for p in parts[:-1]) and parts[-1] not in names:
            names.append(parts[-1])
    if not names:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise FedmoeError(f"no linear layers inside repeated blocks of model type {model_type!r}; pass target modules")
    return names


def attach_lora(model, rank: int = 8, alpha: float | None = None, target_modules=None, dropout: float = 0.0):
    """Wrap a base model with a fresh peft LoRA adapter named 'default'."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if rank < 1:
        raise FedmoeError(f"LoRA rank must be >= 1, got {rank}")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        target_modules=list(target_modules or default_target_modules(model)),
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def is_quantized_4bit(model) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


_FINGERPRINT_FILES = (".safetensors", ".bin")
_fingerprint_cache: dict[tuple, str] = {}


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the model config (minus library-version fields) and every weight file.

    Cached per process by (path, sizes, mtimes): a 7B model hashes once.
    """
    path = check_model_dir(path)
    weights = sorted(p for p in path.iterdir() if p.suffix in _FINGERPRINT_FILES)
    key = (str(path.resolve()),) + tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights)
    if key in _fingerprint_cache:
        return _fingerprint_cache[key]
    config = json.loads((path / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"):
        config.pop(volatile, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for p in weights:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    digest = "sha256:" + h.hexdigest()[:32]
    _fingerprint_cache[key] = digest
    return digest


ADAPTER_META = "fedmoe_adapter.json"


def save_adapter(peft_model, out: str | os.PathLike, base_fingerprint: str, **meta) -> Path:
    """Save a standard peft adapter directory plus fedmoe's metadata (base fingerprint)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    (out / ADAPTER_META).write_text(json.dumps({"base_fingerprint": base_fingerprint, **meta}, indent=2, sort_keys=True))
    return out


def load_adapter(model, adapter_dir: str | os.PathLike, base_fingerprint: str | None = None, adapter_name: str = "default", is_trainable: bool = False):
    """Load a peft adapter directory onto a base (or peft) model, checking it was made for this base."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FedmoeError(f"not a peft adapter directory (no adapter_config.json): {adapter_dir}")
    meta_path = adapter_dir / ADAPTER_META
    if base_fingerprint and meta_path.is_file():
        made_for = json.loads(meta_path.read_text()).get("base_fingerprint")
        if made_for and made_for != base_fingerprint:
            raise FedmoeError(f"adapter {adapter_dir} was made for base model {made_for}, but this base is {base_fingerprint}")
    try:
        if hasattr(model, "load_adapter") and hasattr(model, "peft_config"):
            model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedmoeError(f"adapter {adapter_dir} does not fit this base model: {first[:200]}") from None


def adapter_spec_for(model_dir: str | os.PathLike, rank: int = 8, target_modules=None):
    """The LoRA module shapes of a model, built on the meta device (no weights loaded),
    so a coordinator can validate updates for a 7B base without holding it."""
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedmoe.shared.delta import AdapterSpec

    config = AutoConfig.from_pretrained(str(check_model_dir(model_dir)))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    targets = list(target_modules or default_target_modules(model))
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules=targets, task_type="CAUSAL_LM"))
    return AdapterSpec.from_peft_model(peft_model)
