"""`SmileGate`: zero-shot routing by each expert's dominant input subspace (SMILE).

SMILE (Tang et al. 2024, "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts
Construction From Pre-Trained Foundation Models") observes that a fine-tuned update
ΔW = B A acts only on inputs in its right singular subspace: an input x the expert was
tuned for has a large component ‖V_kᵀ x‖ in the top-k right singular vectors V_k of
that expert's ΔW. So, per LoRA layer of the first `blocks` decoder blocks, each
expert gets V_k (k = `subspace_rank`, small), a prompt's layer inputs (the base model's
hidden states entering that layer) are projected on every expert's V_k, and the
expert whose subspace holds the largest share of x's energy wins:

    score_e = mean over layers and prompt tokens of ‖V_k,eᵀ x‖² / ‖x‖²,
    p = softmax(score / temperature), top-1 like Arrow.

The share (not the raw norm) makes the temperature independent of the hidden states'
scale. V_k comes from the factors alone: with A ᵀ = Q_a R_a and B = Q_b R_b,
ΔW = Q_b (R_b R_aᵀ) Q_aᵀ, so the SVD of the r × r core gives V = Q_a V_core; no
out × in matrix is ever formed. Like Arrow it reads no data: only the adapters'
weights and the request.
"""

from __future__ import annotations

import torch

from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.features import decoder_layers, layer_token_mean


def right_subspace(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k right singular vectors [in, k] of B A (a: [r, in], b: [out, r]), from the factors."""
    q_a, r_a = torch.linalg.qr(a.double().T)  # [in, r], [r, r]
    _, r_b = torch.linalg.qr(b.double())  # [r, r]
    _, _, vh = torch.linalg.svd(r_b @ r_a.T)
    return (q_a @ vh[: min(k, vh.shape[0])].T).float()


class SmileGate:
    name = "smile"
    needs_data = False
    site_requirements = "nothing: routes from the experts' own weights (their ΔW's top right singular subspaces)"

    def __init__(self, served, subspace_rank: int = 4, temperature: float = 0.02, blocks: int = 1):
        from peft.tuners.lora import LoraLayer

        if subspace_rank < 1 or temperature <= 0 or blocks < 1:
            raise FedmoeError(f"smile gate: subspace_rank and blocks must be >= 1 and temperature > 0, "
                              f"got {subspace_rank}, {blocks}, {temperature}")
        self.served, self.experts = served, list(served.experts)
        self.subspace_rank, self.temperature, self.blocks = int(subspace_rank), float(temperature), int(blocks)
        model_blocks = list(decoder_layers(served.model))
        self.layers = [module for block in model_blocks[: min(self.blocks, len(model_blocks))] for module in block.modules()
                       if isinstance(module, LoraLayer) and all(e in module.lora_A for e in self.experts)]
        if not self.layers:
            raise FedmoeError("smile gate: no LoRA layers holding every expert in the first decoder blocks")
        self.refresh()

    def refresh(self) -> None:
        """(Re)compute each layer's expert subspaces from the experts' current weights
        (at construction, and after a hot swap changed them in place)."""
        self.subspaces = [torch.stack([
            right_subspace(module.lora_A[e].weight.detach(), module.lora_B[e].weight.detach(), self.subspace_rank)
            for e in self.experts]) for module in self.layers]  # [K, in, k] each

    @torch.no_grad()
    def route(self, prompts: list[str]) -> torch.Tensor:
        def share(i: int, x: torch.Tensor) -> torch.Tensor:  # [n, t, K]: each expert's share of ‖x‖²
            proj = torch.einsum("nti,eik->ntek", x, self.subspaces[i].to(x.device))
            return proj.pow(2).sum(-1) / x.pow(2).sum(-1, keepdim=True).clamp(min=1e-12)

        score = layer_token_mean(self.served, self.layers, prompts, self.blocks, share)
        return torch.softmax(score / self.temperature, dim=-1).cpu()

    def state(self):
        return {}, {"subspace_rank": self.subspace_rank, "temperature": self.temperature, "blocks": self.blocks}

    @classmethod
    def from_state(cls, served, tensors, meta):
        return cls(served, **{k: meta[k] for k in ("subspace_rank", "temperature", "blocks") if k in meta})
