"""Exact LoRA aggregation for many sites in flat memory: a randomized range finder.

The stacked-QR path of `fedmoe.server.federation.aggregation` is exact, but its work grows with
(Σr)² and its memory with Σr: at 7B shapes (4096 x 4096, rank 16) a thousand sites
stack 16 000 columns per factor. Here ΔW = Σ_k p_k s_k B_k A_k is touched only through
products with thin matrices, site by site (Halko, Martinsson & Tropp 2011, alg. 4.4):

    Y = Σ_k c_k B_k (A_k Ω)          one pass, Ω: in x l Gaussian, l = rank + oversample
    Q = qr(Y);  then `power_iters` times  Q = qr(ΔW qr(ΔWᵀ Q))   two passes each
    C = Qᵀ ΔW = Σ_k c_k (Qᵀ B_k) A_k  one last pass;  C = U S Vᵀ (l x in, small SVD)
    ΔW ≈ (Q U) S Vᵀ, truncated to `max_rank` components

No dense ΔW (per site or summed) and no out x Σr stack is ever formed; the state is a
few out x l and in x l matrices per module, whatever the number of sites. When l ≥ Σr
(the rank of ΔW) the range is captured whole and the result is exact to rounding;
otherwise it is the rank-`max_rank` truncated SVD of the sum up to the randomized
method's error, which power iterations shrink geometrically (tests bound it against
the dense SVD). `updates` is anything that can be iterated more than once (a list, or
a callable returning a fresh iterator: updates spooled to disk, a generator), since
the method makes 2 + 2·power_iters passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from fedmoe.server.federation.low_rank import LowRank
from fedmoe.shared.delta import LoraDelta

Updates = Iterable[tuple[LoraDelta, float]] | Callable[[], Iterable[tuple[LoraDelta, float]]]


def _passes(updates: Updates):
    return updates() if callable(updates) else iter(updates)


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x.double())[0].to(x.dtype)


def streaming_lora_aggregate(updates: Updates, max_rank: int, oversample: int = 8, power_iters: int = 1,
                             seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, LowRank]:
    """Σ p_k s_k B_k A_k per module as a rank-`max_rank` `LowRank` (SVD form, like
    `exact_lora_aggregate`), in memory independent of the number of sites."""
    if max_rank < 1:
        raise ValueError("max_rank must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, int]] = {}
    sketch: dict[str, torch.Tensor] = {}  # Ω per module
    acc: dict[str, torch.Tensor] = {}
    total = 0.0
    ranks = 0

    # Pass 1: Y = ΔW Ω (modules are discovered here; every site must have the same ones).
    for delta, weight in _passes(updates):
        total += weight
        ranks += delta.rank
        c = weight * delta.scaling
        for m in delta.modules():
            a, b = delta.factors(m)
            if m not in shapes:
                shapes[m] = (b.shape[0], a.shape[1])
            if m not in sketch:
                width = min(max_rank + oversample, *shapes[m])
                sketch[m] = torch.randn(shapes[m][1], width, generator=gen, dtype=dtype)
                acc[m] = torch.zeros(shapes[m][0], width, dtype=dtype)
            acc[m].addmm_(b.to(dtype), a.to(dtype) @ sketch[m], alpha=c)
    if not shapes or total <= 0:
        raise ValueError("no updates to aggregate")
    q = {m: _orthonormal(y) for m, y in acc.items()}
    del sketch

    for _ in range(power_iters):
        # Z = ΔWᵀ Q, then Y = ΔW orth(Z): two passes.
        z = {m: torch.zeros(shapes[m][1], q[m].shape[1], dtype=dtype) for m in q}
        for delta, weight in _passes(updates):
            c = weight * delta.scaling
            for m in q:
                a, b = delta.factors(m)
                z[m].addmm_(a.to(dtype).T, b.to(dtype).T @ q[m], alpha=c)
        qz = {m: _orthonormal(v) for m, v in z.items()}
        del z
        y = {m: torch.zeros(shapes[m][0], q[m].shape[1], dtype=dtype) for m in q}
        for delta, weight in _passes(updates):
            c = weight * delta.scaling
            for m in q:
                a, b = delta.factors(m)
                y[m].addmm_(b.to(dtype), a.to(dtype) @ qz[m], alpha=c)
        q = {m: _orthonormal(v) for m, v in y.items()}
        del y, qz

    # Last pass: C = Qᵀ ΔW (l x in), then its small SVD.
    core = {m: torch.zeros(q[m].shape[1], shapes[m][1], dtype=dtype) for m in q}
    for delta, weight in _passes(updates):
        c = weight * delta.scaling
        for m in q:
            a, b = delta.factors(m)
            core[m].addmm_(q[m].T @ b.to(dtype), a.to(dtype), alpha=c)
    out = {}
    for m in sorted(q):
        u, s, vh = torch.linalg.svd(core.pop(m).double() / total, full_matrices=False)
        k = min(max_rank, s.numel())
        root = s[:k].sqrt()
        out[m] = LowRank(((q[m].double() @ u[:, :k]) * root).float(), (root[:, None] * vh[:k]).float())
    return out


def naive_lora_aggregate_stream(updates: Updates) -> dict[str, LowRank]:
    """FedIT in one pass with running sums (the baseline's flat-memory form): weighted
    means of √s_k A_k and √s_k B_k, zero-padded to the largest rank seen."""
    a_sum: dict[str, torch.Tensor] = {}
    b_sum: dict[str, torch.Tensor] = {}
    total = 0.0
    for delta, weight in _passes(updates):
        total += weight
        root = math.sqrt(delta.scaling) * weight
        for m in delta.modules():
            a, b = delta.factors(m)
            if m not in a_sum:
                a_sum[m] = torch.zeros(a.shape, dtype=torch.float32)
                b_sum[m] = torch.zeros(b.shape, dtype=torch.float32)
            r = a.shape[0]
            if r > a_sum[m].shape[0]:  # a larger rank arrives: grow with zeros
                a_sum[m] = torch.nn.functional.pad(a_sum[m], (0, 0, 0, r - a_sum[m].shape[0]))
                b_sum[m] = torch.nn.functional.pad(b_sum[m], (0, r - b_sum[m].shape[1]))
            a_sum[m][:r].add_(a, alpha=root)
            b_sum[m][:, :r].add_(b, alpha=root)
    if total <= 0:
        raise ValueError("no updates to aggregate")
    return {m: LowRank(b_sum[m] / total, a_sum[m] / total) for m in sorted(a_sum)}
