"""Writing experts as standard peft adapter directories (no base model needed)."""

from __future__ import annotations

import json
from pathlib import Path

from fedmoe.shared.delta import LoraDelta
from fedmoe.shared.modeling import ADAPTER_META


def save_expert(delta: LoraDelta, out: str | Path, model_dir: str | Path, **meta) -> Path:
    """`out/adapter_config.json` + `adapter_model.safetensors`, loadable by stock
    `PeftModel.from_pretrained`, plus fedmoe's metadata (base fingerprint)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted({m.rsplit(".", 1)[-1] for m in delta.modules()})
    config = LoraConfig(r=delta.rank, lora_alpha=delta.alpha, target_modules=targets, task_type="CAUSAL_LM",
                        base_model_name_or_path=str(model_dir))
    config.save_pretrained(str(out))
    save_file({k: v.float().contiguous() for k, v in delta.tensors.items()}, str(out / "adapter_model.safetensors"))
    (out / ADAPTER_META).write_text(json.dumps({"base_fingerprint": delta.base_fingerprint, **meta}, indent=2, sort_keys=True))
    return out
