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
    model: str | None = None  # a model folder or a fetchable name (fedmoe model fetch); None: the tiny model
    fraction: float = 1.0  # share of each domain's sites sampled per round
    suite: str = "synthetic"  # synthetic (made-up facts, exact match) or wordnet (real glosses, multiple choice)
    terms_per_domain: int = 120  # wordnet: terms sampled per domain (every conflict term is kept besides)

    @property
    def sites_per_domain(self) -> int:
        return self.sites // self.domains


# `fedmoe simulate` flags that override a preset field (flag name -> field).
OVERRIDES = ("local_steps", "lr", "batch_size", "ranks", "quant", "sites_per_domain", "fraction", "seed", "model")


def with_overrides(preset: SimPreset, overrides: dict) -> SimPreset:
    """The preset with the given fields replaced (None values keep the preset's)."""
    from dataclasses import replace

    from fedmoe.shared.errors import FedmoeError

    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OVERRIDES))
    if unknown:
        raise FedmoeError(f"unknown simulate override {unknown[0]!r}: choose from {', '.join(OVERRIDES)}")
    if "ranks" in given:
        given["ranks"] = tuple(int(r) for r in given["ranks"])
        if not given["ranks"] or min(given["ranks"]) < 1:
            raise FedmoeError(f"--ranks must be positive integers, got {given['ranks']}")
    if "sites_per_domain" in given:
        if given["sites_per_domain"] < 1:
            raise FedmoeError(f"--sites-per-domain must be >= 1, got {given['sites_per_domain']}")
        given["sites"] = preset.domains * given.pop("sites_per_domain")
    for name in ("local_steps", "batch_size"):
        if name in given and given[name] < 1:
            raise FedmoeError(f"--{name.replace('_', '-')} must be >= 1, got {given[name]}")
    if "lr" in given and not given["lr"] > 0:
        raise FedmoeError(f"--lr must be positive, got {given['lr']}")
    if "fraction" in given and not 0 < given["fraction"] <= 1:
        raise FedmoeError(f"--fraction must be in (0, 1], got {given['fraction']}")
    if "quant" in given:
        from fedmoe.shared.modeling import QUANT_MODES

        if given["quant"] not in QUANT_MODES:
            raise FedmoeError(f"unknown --quant {given['quant']!r}: choose one of {', '.join(QUANT_MODES)}")
    return replace(preset, **given)


PRESETS = {
    "smoke": SimPreset(domains=2, sites=4, rounds=2, local_steps=12, ranks=(8,), router_rounds=8, latency_requests=8),
    "default": SimPreset(domains=4, sites=8, rounds=4, local_steps=30, ranks=(8, 8, 8, 8, 16, 4, 16, 4)),
    # SmolLM2-135M on WordNet glosses (law, medicine, computing, finance), scored as
    # multiple choice. Sized to finish on an idle 2-core CPU within 25 minutes, baselines
    # and MoE report included: an NF4 step of batch 16 costs ~2.4 s there (2 threads);
    # scoring a record costs its four choices' forwards, so few terms (8 a domain, plus
    # every conflict term). Depth 8 (4 rounds x 2 local steps): one domain's pooled data
    # trained for 4 / 8 / 12 steps at lr 5e-3 scored acc_norm 0.86 / 1.00 / 1.00 on its
    # eval questions (law, 14 records; 1e-2 diverged), so 8 steps is the plateau.
    "real": SimPreset(domains=4, sites=8, rounds=4, local_steps=2, ranks=(8,), batch_size=16, lr=5e-3,
                      router_rounds=5, latency_requests=4, model="smollm2-135m", suite="wordnet", terms_per_domain=8),
}
