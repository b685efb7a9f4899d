"""Privacy on the site's update, before it leaves (frozen-A / FFA-LoRA modes).

In the `dp` and `secagg` privacy modes the coordinator sends a shared A that sites do
not train (FFA-LoRA): ΔW_k = s (B_k - B_0) A, so the federation's update is linear in
the sites' B changes, the sum of site messages *is* the exact aggregate, and clipping
B's change clips exactly what is summed. The site clips its update
u_k = s (B_k - B_0) (all modules together, Frobenius norm) to `clip` before replying —
Flower's client-side fixed clipping, applied to the quantity our aggregate is linear in.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from fedmoe.shared.delta import LoraDelta
from fedmoe.shared.errors import FedmoeError


@contextmanager
def frozen_lora_a(model):
    """Train only lora_B: the shared A stays exactly what the coordinator sent."""
    params = [p for n, p in model.named_parameters() if "lora_A" in n]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


def b_update_norm(trained: LoraDelta, received: LoraDelta) -> float:
    total = 0.0
    for m in trained.modules():
        _, bt = trained.factors(m)
        _, b0 = received.factors(m)
        total += float(((bt.double() * trained.scaling - b0.double() * received.scaling) ** 2).sum())
    return math.sqrt(total)


def clip_b_update(trained: LoraDelta, received: LoraDelta, clip: float) -> tuple[LoraDelta, float]:
    """(B_0 + c (B_k - B_0) with the received A, norm before clipping); c = min(1, clip / norm)."""
    if trained.rank != received.rank or trained.alpha != received.alpha:
        raise FedmoeError("frozen-A reply must keep the received rank and alpha")
    norm = b_update_norm(trained, received)
    c = min(1.0, clip / norm) if norm > 0 else 1.0
    factors = {}
    for m in trained.modules():
        a0, b0 = received.factors(m)
        _, bt = trained.factors(m)
        factors[m] = (a0.float().clone(), (b0.float() + c * (bt.float() - b0.float())).contiguous())
    return LoraDelta.from_factors(factors, trained.rank, trained.alpha, trained.base_fingerprint), norm
