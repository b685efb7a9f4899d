"""Scenario presets for `fedmoe simulate`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimPreset:
    domains: int
    sites: int
    rounds: int
    local_steps: int
    ranks: tuple[int, ...]  # cycled over sites: heterogeneous ranks within each domain
    quant: str = "nf4"
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    router_rounds: int = 20  # learned gate: federated router rounds
    latency_requests: int = 16  # requests timed per gate for latency_ratio


PRESETS = {
    "smoke": SimPreset(domains=2, sites=4, rounds=2, local_steps=12, ranks=(8,), router_rounds=8, latency_requests=8),
    "default": SimPreset(domains=4, sites=8, rounds=4, local_steps=30, ranks=(8, 8, 8, 8, 16, 4, 16, 4)),
}
