"""Chaos injection for simulations: sites that turn faulty or malicious on a seeded schedule.

`--chaos "nan=0.1,shape=0.05,scale=0.1,dropout=0.2[,seed=N]"` gives each fault a probability per
(round, site, expert) TRAIN message; at most one fault hits a message (one uniform draw
against the cumulative rates, in the order nan, shape, scale, dropout). The schedule is
a pure function of (seed, round, site, expert), so the site that corrupts its reply and
the report that lists what was injected compute the same thing without talking.

- nan: one factor of the trained adapter gets NaNs;
- shape: one lora_B factor loses a column (a wrong shape);
- scale: a boosted update, lora_B multiplied by `SCALE_BOOST` (ΔW grows by that factor);
- dropout: the site fails the message instead of replying.
"""

from __future__ import annotations

import random

import torch

from fedmoe.shared.delta import LoraDelta
from fedmoe.shared.errors import FedmoeError

FAULTS = ("nan", "shape", "scale", "dropout")
SCALE_BOOST = 25.0


class ChaosDropout(RuntimeError):
    """Raised by a site told to drop out of a round (arrives as an error reply)."""


def parse_chaos(spec: str | None) -> dict[str, float]:
    if not spec:
        return {}
    rates: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name == "seed":
            continue  # chaos_seed reads it
        if name not in FAULTS:
            raise FedmoeError(f"--chaos: unknown fault {name!r}: choose from {', '.join(FAULTS)}")
        try:
            rate = float(value)
        except ValueError:
            raise FedmoeError(f"--chaos: {name}={value!r} is not a number") from None
        if not 0 <= rate <= 1:
            raise FedmoeError(f"--chaos: {name}={rate} must be in [0, 1]")
        rates[name] = rate
    if sum(rates.values()) > 1 + 1e-9:
        raise FedmoeError(f"--chaos: rates add up to {sum(rates.values()):.2f} > 1")
    return rates


def chaos_seed(spec: str | None, default: int) -> int:
    """`seed=N` in the spec (default: the run's seed): which messages the faults hit."""
    for part in (spec or "").split(","):
        name, _, value = part.partition("=")
        if name.strip() == "seed":
            try:
                return int(value)
            except ValueError:
                raise FedmoeError(f"--chaos: seed={value!r} is not an integer") from None
    return default


def format_chaos(rates: dict[str, float], seed: int) -> str:
    return ",".join(f"{k}={v:g}" for k, v in rates.items()) + f",seed={seed}"


def fault_for(rates: dict[str, float], seed: int, rnd: int, site: str, expert: str) -> str | None:
    if not rates:
        return None
    u = random.Random(f"chaos/{seed}/{rnd}/{site}/{expert}").random()
    acc = 0.0
    for name in FAULTS:
        acc += rates.get(name, 0.0)
        if u < acc:
            return name
    return None


def schedule(rates: dict[str, float], seed: int, rounds: int, sites: list[str], experts_of: dict[str, list[str]]) -> list[dict]:
    """Every injected fault of a run: [{round, site, expert, fault}] (all sites sampled every round)."""
    out = []
    for rnd in range(1, rounds + 1):
        for site in sites:
            for expert in experts_of.get(site, []):
                fault = fault_for(rates, seed, rnd, site, expert)
                if fault:
                    out.append({"round": rnd, "site": site, "expert": expert, "fault": fault})
    return out


def corrupt(delta: LoraDelta, fault: str | None) -> LoraDelta:
    """The trained adapter as a faulty site would send it (dropout raises)."""
    if fault is None:
        return delta
    if fault == "dropout":
        raise ChaosDropout("chaos: site dropped out of this round")
    tensors = {k: v.clone() for k, v in delta.tensors.items()}
    first_b = sorted(k for k in tensors if k.endswith(".lora_B.weight"))[0]
    if fault == "nan":
        tensors[first_b].view(-1)[0] = float("nan")
    elif fault == "shape":
        tensors[first_b] = tensors[first_b][:, :-1].contiguous()
    elif fault == "scale":
        tensors = {k: (v * SCALE_BOOST if k.endswith(".lora_B.weight") else v) for k, v in tensors.items()}
    else:
        raise FedmoeError(f"unknown chaos fault {fault!r}")
    return LoraDelta(tensors, delta.rank, delta.alpha, delta.base_fingerprint)


def corrupt_for(node_cfg: dict, train_cfg, site_name: str, trained: LoraDelta) -> LoraDelta:
    """Apply the fault the schedule in a simulated site's config (`chaos`, `chaos-seed`) names
    for this TRAIN message; no `chaos` key: the reply is untouched."""
    rates = parse_chaos(node_cfg.get("chaos"))
    fault = fault_for(rates, chaos_seed(node_cfg.get("chaos"), 0), int(train_cfg.get("round", 0)), site_name,
                      str(train_cfg.get("expert", "")))
    return corrupt(trained, fault)
