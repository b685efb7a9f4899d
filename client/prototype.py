"""What a site sends, once, for the coordinator's prototype gate.

The site computes, on its own base model, the routing feature of every training prompt
(`fedmoe.shared.features`: a kernel mean embedding of base-model hidden states), clips
each to L2 norm `clip_norm`, sums them, adds Gaussian noise N(0, (noise_multiplier *
clip_norm)^2 I) to the sum and divides by the count. That is the Gaussian mechanism on
a sum whose add/remove-one sensitivity is clip_norm; `epsilon(delta)` reports its
(epsilon, delta) guarantee for this one release (the analytic bound of Balle & Wang,
2018). The message is one float vector and three numbers: no text, no token ids. The
count is sent in the clear (the coordinator weights sites by it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedmoe.shared.dp_noise import gaussian_noise
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.features import PromptFeaturizer, record_prompt

DEFAULT_CLIP_NORM = 0.25       # prompt features have norm ~ 1/sqrt(tokens); 0.25 clips few
DEFAULT_NOISE_MULTIPLIER = 0.3  # keeps routing >= 95% on the default suite (epsilon ~ 19 at delta 1e-5)


@dataclass(frozen=True)
class PrototypeMessage:
    """The site's whole contribution to the prototype gate."""

    prototype: torch.Tensor  # float32 [feature dim]: noised mean of clipped features
    count: int               # prompts averaged
    clip_norm: float
    noise_multiplier: float

    def epsilon(self, delta: float = 1e-5) -> float:
        return gaussian_epsilon(self.noise_multiplier, delta)

    def to_records(self):
        """(ArrayRecord, MetricRecord) for a Flower reply."""
        from flwr.app import ArrayRecord, MetricRecord

        return (ArrayRecord({"prototype": self.prototype.detach().cpu().float()}),
                MetricRecord({"count": int(self.count), "clip-norm": float(self.clip_norm),
                              "noise-multiplier": float(self.noise_multiplier)}))

    @classmethod
    def from_records(cls, arrays, metrics) -> "PrototypeMessage":
        state = arrays.to_torch_state_dict()
        if "prototype" not in state:
            raise FedmoeError("prototype message lacks the 'prototype' array")
        return cls(state["prototype"].float(), int(metrics["count"]), float(metrics["clip-norm"]),
                   float(metrics["noise-multiplier"]))


def site_prototype(featurizer: PromptFeaturizer, records, clip_norm: float = DEFAULT_CLIP_NORM,
                   noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER) -> PrototypeMessage:
    """The DP-noised mean routing feature of a site's training prompts. The noise takes
    no seed on purpose (fedmoe.shared.dp_noise): a seeded one could be subtracted."""
    prompts = [record_prompt(r) for r in records]
    if not prompts:
        raise FedmoeError("no training records to build a prototype from")
    if clip_norm <= 0 or noise_multiplier < 0:
        raise FedmoeError(f"prototype privacy needs clip_norm > 0 and noise_multiplier >= 0, got {clip_norm}, {noise_multiplier}")
    feats = featurizer(prompts)
    feats = feats * (clip_norm / feats.norm(dim=1, keepdim=True).clamp(min=clip_norm))
    total = feats.sum(0)
    total = total + gaussian_noise(total.shape, noise_multiplier * clip_norm, total.dtype)
    return PrototypeMessage((total / len(prompts)).float(), len(prompts), float(clip_norm), float(noise_multiplier))


def gaussian_epsilon(noise_multiplier: float, delta: float = 1e-5) -> float:
    """Smallest epsilon with the Gaussian mechanism (sensitivity 1, sigma = noise_multiplier)
    being (epsilon, delta)-DP, by the analytic condition
    Phi(1/(2s) - e s) - exp(e) Phi(-1/(2s) - e s) <= delta."""
    if noise_multiplier <= 0:
        return math.inf
    s = noise_multiplier
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731

    def delta_at(eps: float) -> float:
        return phi(1 / (2 * s) - eps * s) - math.exp(eps) * phi(-1 / (2 * s) - eps * s)

    lo, hi = 0.0, 1.0
    while delta_at(hi) > delta:
        hi *= 2
        if hi > 1e4:
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi
