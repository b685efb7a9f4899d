"""Aggregating LoRA updates into one expert.

**Exact** aggregation: the expert's weight update is ΔW = Σ_k p_k s_k B_k A_k (s_k =
alpha_k / r_k), never the product of averaged factors. It is computed from the stacked
factors — B_cat = [p_1 s_1 B_1 | ... ] (out x Σr), A_cat = [A_1; ...] (Σr x in) — with
two thin QRs and an SVD of the small Σr x Σr core, so no dense out x in matrix per
site is ever formed. The result is kept in SVD form (components ordered by singular
value), so handing it to a site of rank r is a truncation: the best rank-r
approximation. Sites of different ranks (4/8/16) all contribute their full rank.

**Naive** (FedIT) aggregation averages A and B separately (zero-padded to the largest
rank, HetLoRA-style slicing back), the baseline exact aggregation is measured against.
"""

from __future__ import annotations

import math

import torch

from fedmoe.server.federation.low_rank import LowRank
from fedmoe.shared.delta import LoraDelta


def stacked_factors(updates: list[tuple[LoraDelta, float]], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    bs, as_ = [], []
    for delta, weight in updates:
        a, b = delta.factors(module)
        bs.append(b.double() * (weight * delta.scaling))
        as_.append(a.double())
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def svd_of_product(b: torch.Tensor, a: torch.Tensor) -> LowRank:
    """SVD form of b @ a via thin QRs: U sqrt(S) and sqrt(S) V^T, singular values descending."""
    qb, rb = torch.linalg.qr(b)  # b = qb rb, qb: [out, k]
    qa, ra = torch.linalg.qr(a.T)  # a^T = qa ra
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    root = s.sqrt()
    return LowRank((qb @ u) * root, root[:, None] * (vh @ qa.T))


# Above this many stacked components (Σ r_k) the stacked QR's (Σr)² work and Σr-wide
# memory lose to the streaming randomized block Krylov method
# (fedmoe.server.federation.streaming_aggregation.block_krylov_lora_aggregate).
STACK_LIMIT = 256


def exact_lora_aggregate(updates: list[tuple[LoraDelta, float]], max_rank: int) -> dict[str, LowRank]:
    """Σ p_k s_k B_k A_k per module, truncated to `max_rank` components (SVD form)."""
    total = sum(w for _, w in updates)
    if not updates or total <= 0:
        raise ValueError("no updates to aggregate")
    if sum(d.rank for d, _ in updates) > STACK_LIMIT:
        from fedmoe.server.federation.streaming_aggregation import block_krylov_lora_aggregate

        return block_krylov_lora_aggregate(updates, max_rank)
    norm = [(d, w / total) for d, w in updates]
    out = {}
    for module in norm[0][0].modules():
        b, a = stacked_factors(norm, module)
        lr = svd_of_product(b, a)
        out[module] = LowRank(lr.b[:, :max_rank].float(), lr.a[:max_rank].float())
    return out


def naive_lora_aggregate(updates: list[tuple[LoraDelta, float]]) -> dict[str, LowRank]:
    """FedIT: weighted means of A and of B (each scaled by sqrt of its s_k), zero-padded to the largest rank."""
    total = sum(w for _, w in updates)
    r_max = max(d.rank for d, _ in updates)
    out = {}
    for module in updates[0][0].modules():
        a_sum = b_sum = None
        for delta, weight in updates:
            a, b = delta.factors(module)
            root = math.sqrt(delta.scaling)
            a = torch.nn.functional.pad(a.float() * root, (0, 0, 0, r_max - delta.rank))
            b = torch.nn.functional.pad(b.float() * root, (0, r_max - delta.rank))
            a_sum = a * (weight / total) if a_sum is None else a_sum + a * (weight / total)
            b_sum = b * (weight / total) if b_sum is None else b_sum + b * (weight / total)
        out[module] = LowRank(b_sum, a_sum)
    return out


def to_site_delta(expert: dict[str, LowRank], rank: int, alpha: float, fingerprint: str, init: LoraDelta) -> LoraDelta:
    """The expert as a rank-`rank` adapter with the site's alpha.

    Components beyond what the expert holds are filled from `init` (A rows from the
    shared initial adapter, B columns zero) so they still train: with A and B both zero
    a LoRA component gets no gradient.
    """
    scale = alpha / rank
    factors = {}
    for module, lr in expert.items():
        have = min(rank, lr.a.shape[0])
        a0, _ = init.factors(module)
        a = a0[:rank].clone().float()
        b = torch.zeros(lr.b.shape[0], rank)
        a[:have] = lr.a[:have] / math.sqrt(scale)
        b[:, :have] = lr.b[:, :have] / math.sqrt(scale)
        dead = (a.norm(dim=1) < 1e-12) & (b.norm(dim=0) < 1e-12)
        a[dead] = a0[:rank][dead].float()
        factors[module] = (a, b)
    return LoraDelta.from_factors(factors, rank, alpha, fingerprint)


def initial_adapter(spec, rank: int, alpha: float, fingerprint: str, seed: int) -> LoraDelta:
    """The shared starting adapter of an expert: A uniform in ±1/sqrt(in) (peft's
    default scale), B zero, seeded so every site and every resume gets the same one."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for module, (fan_in, fan_out) in sorted(spec.modules.items()):
        a = (torch.rand(rank, fan_in, generator=gen) * 2 - 1) / math.sqrt(fan_in)
        factors[module] = (a, torch.zeros(fan_out, rank))
    return LoraDelta.from_factors(factors, rank, alpha, fingerprint)


def dense_update(expert: dict[str, LowRank], module: str) -> torch.Tensor:
    lr = expert[module]
    return lr.b @ lr.a
