"""`ArrowGate`: zero-shot routing from the experts' own weights (peft's Arrow).

Arrow (Ostapenko et al. 2024) gives each expert, in each LoRA layer, a prototype: the
top right singular vector of its update B A. A token is scored against every expert's
prototype by |<x, proto>|, and the top-k scores are softmaxed into mixing coefficients.
peft ships this as a LoRA variant (`LoraConfig(arrow_config=ArrowConfig(...))`, module
`peft.tuners.lora.arrow`); we add it to the served model as the adapter `arrow_router`
over the loaded experts, exactly as `peft.create_arrow_model` does, and use:

- peft's prototypes (`ArrowLoraLinearLayer.build_prototypes`, power iteration on B A),
- peft's per-token top-k softmax rule, read out per sequence: the mean over the
  prompt's tokens and over the LoRA layers of the first `blocks` decoder blocks gives
  the expert distribution the served model routes on (top-1 via `adapter_names`);
- peft's own token-level Arrow forward as `adapter_names=["arrow_router"]`
  (`token_level_kwargs_fn`), for comparison.

It reads no data: only the adapters' weights and the request itself.
"""

from __future__ import annotations

import torch

from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.features import decoder_layers, layer_token_mean

ROUTER = "arrow_router"


class ArrowGate:
    name = "arrow"
    needs_data = False
    site_requirements = "nothing: routes from the experts' own weights (their ΔW's top right singular vectors)"

    def __init__(self, served, top_k: int = 1, temperature: float = 1.0, blocks: int = 1, seed: int = 0):
        from peft import ArrowConfig, LoraConfig
        from peft.tuners.lora.arrow import check_loaded_lora_compatibility_arrow

        self.served, self.experts = served, list(served.experts)
        self.blocks, self.top_k, self.temperature, self.seed = int(blocks), int(top_k), float(temperature), int(seed)
        model = served.model
        if ROUTER not in model.peft_config:
            try:
                target_modules, rank = check_loaded_lora_compatibility_arrow(model, self.experts)
            except ValueError as exc:
                raise FedmoeError(f"arrow gate needs experts of one rank and one set of modules: {exc}") from None
            config = ArrowConfig(top_k=min(self.top_k, len(self.experts)), router_temperature=self.temperature, rng_seed=self.seed)
            config.task_adapter_names = list(self.experts)
            config.gks_adapter_names = []
            model.add_adapter(ROUTER, LoraConfig(arrow_config=config, target_modules=target_modules, r=rank))
        self.layers = self._router_layers()

    def _router_layers(self):
        from peft.tuners.lora import LoraLayer

        blocks = decoder_layers(self.served.model)
        n = max(1, min(self.blocks, len(blocks)))
        layers = []
        for block in list(blocks)[:n]:
            for module in block.modules():
                if isinstance(module, LoraLayer) and ROUTER in getattr(module, "lora_arrow", {}):
                    layers.append(module)
        if not layers:
            raise FedmoeError("arrow gate: no LoRA layers in the first decoder blocks")
        return layers

    @torch.no_grad()
    def route(self, prompts: list[str]) -> torch.Tensor:
        def coefficients(i: int, x: torch.Tensor) -> torch.Tensor:  # [n, t, K]
            module = self.layers[i]
            arrow = module.lora_arrow[ROUTER]
            arrow.on_adapter_change(module.lora_A, module.lora_B)
            arrow.build_prototypes(module.lora_A, module.lora_B)
            protos = arrow.prototypes[[arrow.task_adapter_names.index(e) for e in self.experts]]
            # peft's ArrowLoraLinearLayer.forward rule: |x . proto|, top-k, softmax / T
            sim = torch.abs(x @ protos.float().T)
            top_v, idx = sim.topk(min(arrow.top_k, sim.shape[-1]), dim=-1)
            score = torch.full_like(sim, float("-inf")).scatter(-1, idx, top_v)
            return torch.softmax(score / arrow.temperature, dim=-1)

        return layer_token_mean(self.served, self.layers, prompts, self.blocks, coefficients).cpu()

    def refresh(self) -> None:
        """The experts' weights changed in place (hot swap): every Arrow layer rebuilds its
        prototypes from them at its next forward (peft caches them until told)."""
        for module in self.served.model.modules():
            if ROUTER in getattr(module, "lora_arrow", {}):
                module.lora_arrow[ROUTER]._protos_ready = False  # what peft's own on_adapter_change resets

    def token_level_kwargs_fn(self):
        """peft's own per-token Arrow forward for every sequence."""
        return lambda records: {"adapter_names": [ROUTER] * len(records)}

    def state(self):
        return {}, {"top_k": self.top_k, "temperature": self.temperature, "blocks": self.blocks, "seed": self.seed}

    @classmethod
    def from_state(cls, served, tensors, meta):
        return cls(served, **{k: meta[k] for k in ("top_k", "temperature", "blocks", "seed") if k in meta})
