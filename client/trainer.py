"""`SiteTrainer`: the site's quantized base model with one LoRA adapter, kept loaded.

One object per site process: `fedmoe train-local`, the site daemon and the simulated
ClientApp all hold one and call `set_adapter` / `train` / `evaluate` on it, so the base
model is loaded (and quantized) once, not once per round.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedmoe.shared.delta import AdapterSpec, LoraDelta
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.modeling import attach_lora, load_base_model, load_tokenizer, model_fingerprint
from fedmoe.shared.training import EvalResult, TrainConfig, TrainResult, evaluate, train_lora


class SiteTrainer:
    def __init__(self, model_dir: str | Path, quant: str = "nf4", rank: int = 8, alpha: float | None = None,
                 device: str | None = None, target_modules=None, seed: int = 0):
        self.model_dir = Path(model_dir)
        self.quant = quant
        self.rank = rank
        self.fingerprint = model_fingerprint(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        base = load_base_model(self.model_dir, quant, device)
        torch.manual_seed(seed)  # the fresh adapter's init, so baselines repeat exactly
        self.model = attach_lora(base, rank=rank, alpha=alpha, target_modules=target_modules)
        self.spec = AdapterSpec.from_peft_model(self.model)
        self.initial = LoraDelta.from_peft_model(self.model, self.fingerprint)

    @property
    def alpha(self) -> float:
        return float(self.model.peft_config["default"].lora_alpha)

    def set_adapter(self, delta: LoraDelta | None) -> None:
        """Load the expert's current factors (None: this trainer's fresh initial adapter)."""
        delta = delta or self.initial
        if delta.rank != self.rank:
            raise FedmoeError(f"received an adapter of rank {delta.rank}, but this site trains rank {self.rank}")
        delta.validate(self.spec, self.fingerprint, where="received adapter")
        delta.apply_to(self.model)
        # Received alpha wins, so B A scaling is what the coordinator meant.
        for module in self.model.modules():
            if hasattr(module, "scaling") and isinstance(getattr(module, "scaling"), dict) and "default" in module.scaling:
                module.lora_alpha["default"] = delta.alpha
                module.scaling["default"] = delta.alpha / delta.rank

    def current_delta(self) -> LoraDelta:
        return LoraDelta.from_peft_model(self.model, self.fingerprint)

    def train(self, records, cfg: TrainConfig, progress=None) -> tuple[LoraDelta, TrainResult]:
        result = train_lora(self.model, self.tokenizer, records, cfg, progress=progress)
        if not all(torch.isfinite(torch.tensor(result.losses))):
            raise FedmoeError("local training diverged (non-finite loss); lower the learning rate")
        return self.current_delta(), result

    def evaluate(self, records) -> EvalResult:
        return evaluate(self.model, self.tokenizer, records)
