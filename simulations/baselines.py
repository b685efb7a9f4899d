"""Baselines trained in-process for the report: each site alone, and pooled data."""

from __future__ import annotations

from fedmoe.client.trainer import SiteTrainer
from fedmoe.shared.data import Record, Site
from fedmoe.shared.training import TrainConfig


def local_only(trainer: SiteTrainer, sites: list[Site], mixed: list[Record], cfg: TrainConfig) -> dict[str, float]:
    """Each site trains alone with the federation's total local steps; each domain's
    accuracy is the mean over its sites' adapters on that domain's mixed records."""
    per_domain: dict[str, list[float]] = {}
    for i, site in enumerate(sites):
        trainer.set_adapter(None)
        trainer.train(site.train, TrainConfig(**{**cfg.__dict__, "seed": cfg.seed + i}))
        records = [r for r in mixed if r.domain == site.domain]
        per_domain.setdefault(site.domain, []).append(trainer.evaluate(records).accuracy)
    return {d: sum(v) / len(v) for d, v in per_domain.items()}


def centralized(trainer: SiteTrainer, sites: list[Site], mixed: list[Record], cfg: TrainConfig) -> dict[str, float]:
    """Upper bound: per domain, one adapter on the domain's pooled data (no federation),
    trained with as many steps as the federation spent on that domain."""
    out = {}
    for domain in sorted({s.domain for s in sites}):
        members = [s for s in sites if s.domain == domain]
        trainer.set_adapter(None)
        trainer.train([r for s in members for r in s.train], TrainConfig(**{**cfg.__dict__, "steps": cfg.steps * len(members)}))
        out[domain] = trainer.evaluate([r for r in mixed if r.domain == domain]).accuracy
    return out
