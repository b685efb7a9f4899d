"""Baselines for the report, each given the compute it is compared at, and saying so.

- `local_only`: each site alone, at its own LoRA rank, for the federation's sequential
  depth (rounds x local steps): what a site gets without federating.
- `centralized`: per domain, one adapter on the domain's pooled data, at the domain
  expert's rank, for the same sequential depth: the expert's bound at equal depth.
- `centralized_pooled`: the same for the summed site steps (depth x the domain's sites):
  the bound at equal total compute.
- `centralized_single`: one adapter on every site's pooled data, at the largest rank, for
  the same depth: the bound of `fedavg_single`.

Each result carries `trained` (steps, rank, data). They need nothing from the federation,
so `fedmoe simulate` trains them in worker processes (`BaselineWorker`, grouped by
`worker_groups`) while the federation runs, at a lower priority than the simulated sites:
the federation and then the MoE stage are the run's critical path, and the baselines fill
the cores those leave. Every job is seeded, so the numbers do not depend on how they overlap.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedmoe.client.trainer import SiteTrainer
from fedmoe.shared.data import Record, Site
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.training import TrainConfig
from fedmoe.simulations.method_scores import domain_scores, mean_scores, with_conflict


@dataclass
class BaselineContext:
    """What every baseline reads: the suite, the federation's training config (its `steps`
    = rounds x local steps) and the sites' ranks (cycled, as the federation assigns them)."""

    model_dir: str
    quant: str
    sites: list[Site]
    mixed: list[Record]
    conflict: list[Record]
    cfg: TrainConfig
    ranks: tuple[int, ...] = (8,)
    progress: object = None
    _trainers: dict = field(default_factory=dict)

    def trainer(self, rank: int) -> SiteTrainer:
        if rank not in self._trainers:
            self._trainers.clear()  # one model in memory at a time
            self._trainers[rank] = SiteTrainer(self.model_dir, self.quant, rank)
        return self._trainers[rank]

    def rank_of(self, i: int) -> int:
        return self.ranks[i % len(self.ranks)]

    def domain_rank(self, domain: str) -> int:
        """The domain expert's rank: the largest of its sites' (the federation aggregates at it)."""
        return max(self.rank_of(i) for i, s in enumerate(self.sites) if s.domain == domain)

    def say(self, text: str) -> None:
        if self.progress:
            self.progress(text)


def eval_coverage(site: Site, records: list[Record]) -> float | None:
    """The share of `records` (a domain's evaluation questions) whose answer occurs among
    the site's own training completions: what a site training alone can at best have
    seen. Questions are matched by answer, not phrasing (evaluation phrasings are new)."""
    if not records:
        return None
    seen = {r.completion.strip() for r in site.train}
    return sum(r.completion.strip() in seen for r in records) / len(records)


def local_only_ceiling(sites: list[Site], mixed: list[Record]) -> dict:
    """Per domain, the mean over its sites of `eval_coverage` on that domain's mixed
    records, and the record-weighted mean over domains ("mixed")."""
    per_domain: dict[str, list[float]] = {}
    for site in sites:
        cover = eval_coverage(site, [r for r in mixed if r.domain == site.domain])
        if cover is not None:
            per_domain.setdefault(site.domain, []).append(cover)
    means = {d: sum(v) / len(v) for d, v in sorted(per_domain.items())}
    counts = {d: sum(r.domain == d for r in mixed) for d in means}
    total = sum(counts.values())
    return {"per_domain": means, "mixed": sum(means[d] * counts[d] for d in means) / total if total else None}


def local_only(ctx: BaselineContext) -> dict:
    """Each site alone at its own rank; a domain's scores are the mean over its sites'
    adapters on that domain's mixed (and conflict) records. `trained` carries the
    ceiling: the share of its domain's eval answers a site's own data holds."""
    per_domain: dict[str, list[dict]] = {}
    for i, site in enumerate(ctx.sites):
        trainer = ctx.trainer(ctx.rank_of(i))
        trainer.set_adapter(None)
        trainer.train(site.train, TrainConfig(**{**ctx.cfg.__dict__, "seed": ctx.cfg.seed + i}))
        per_domain.setdefault(site.domain, []).append(_scores(trainer, site.domain, ctx))
        ctx.say(f"baseline local_only: {Path(site.path).name} ({site.domain}, rank {ctx.rank_of(i)}) "
                f"{_headline(per_domain[site.domain][-1])} [{i + 1}/{len(ctx.sites)}]")
    return {"scores": {d: mean_scores(v) for d, v in per_domain.items()},
            "trained": {"steps": ctx.cfg.steps, "rank": "each site's own", "data": "one site's own data",
                        "ceiling": local_only_ceiling(ctx.sites, ctx.mixed)}}


def _pooled(ctx: BaselineContext, name: str, steps_per_member: bool) -> dict:
    out = {}
    for domain in sorted({s.domain for s in ctx.sites}):
        members = [s for s in ctx.sites if s.domain == domain]
        trainer = ctx.trainer(ctx.domain_rank(domain))
        trainer.set_adapter(None)
        steps = ctx.cfg.steps * (len(members) if steps_per_member else 1)
        trainer.train([r for s in members for r in s.train], TrainConfig(**{**ctx.cfg.__dict__, "steps": steps}))
        out[domain] = _scores(trainer, domain, ctx)
        ctx.say(f"baseline {name}: {domain} ({steps} steps) {_headline(out[domain])}")
    return out


def centralized(ctx: BaselineContext) -> dict:
    """Per domain, pooled data, the federation's sequential depth: the expert's bound."""
    return {"scores": _pooled(ctx, "centralized", steps_per_member=False),
            "trained": {"steps": ctx.cfg.steps, "rank": "the domain expert's", "data": "the domain's sites, pooled"}}


def centralized_pooled(ctx: BaselineContext) -> dict:
    """Per domain, pooled data, the summed site steps: equal total compute."""
    return {"scores": _pooled(ctx, "centralized_pooled", steps_per_member=True),
            "trained": {"steps": f"{ctx.cfg.steps} x the domain's sites", "rank": "the domain expert's",
                        "data": "the domain's sites, pooled"}}


def centralized_single(ctx: BaselineContext) -> dict:
    """One adapter on all sites' pooled data, the federation's depth: fedavg_single's bound."""
    rank = max(ctx.ranks)
    trainer = ctx.trainer(rank)
    trainer.set_adapter(None)
    trainer.train([r for s in ctx.sites for r in s.train], ctx.cfg)
    out = {d: _scores(trainer, d, ctx) for d in sorted({s.domain for s in ctx.sites})}
    ctx.say(f"baseline centralized_single: {', '.join(f'{d} {_headline(v)}' for d, v in out.items())}")
    return {"scores": out, "trained": {"steps": ctx.cfg.steps, "rank": rank, "data": "every site, pooled"}}


def _scores(trainer: SiteTrainer, domain: str, ctx: BaselineContext) -> dict:
    """The trainer's current adapter on one domain's mixed and conflict records."""
    mine = [r for r in ctx.mixed if r.domain == domain]
    scores = domain_scores(trainer.model, trainer.tokenizer, mine)[domain]
    clash = domain_scores(trainer.model, trainer.tokenizer, [r for r in ctx.conflict if r.domain == domain])
    return with_conflict({domain: scores}, clash)[domain]


def _headline(scores: dict) -> str:
    name = "acc_norm" if "acc_norm" in scores else "exact_match"
    return f"{name} {scores[name]:.3f}"


BASELINES = {"local_only": local_only, "centralized": centralized, "centralized_pooled": centralized_pooled,
             "centralized_single": centralized_single}
# Two workers of about equal training (sites x steps + steps, and sites x steps + domains x
# steps) when there is enough of it; a worker's start-up (imports, model load: ~10 s of CPU
# on 2 cores) pays for itself only then: measured, the smoke preset (96 steps a baseline)
# took 94 s with a worker per baseline vs 79 s with one.
GROUPS = (("local_only", "centralized_single"), ("centralized_pooled", "centralized"))
SPLIT_STEPS = 300


def worker_groups(sites: int, steps: int) -> list[tuple[str, ...]]:
    """The baselines each worker trains: two balanced groups when each has at least
    SPLIT_STEPS steps of training, else one worker for all."""
    return list(GROUPS) if sites * steps >= SPLIT_STEPS else [tuple(BASELINES)]


def run_baselines(model_dir: str, quant: str, suite: str, cfg: dict, names=tuple(BASELINES), ranks=(8,)) -> dict:
    """The named baselines on the suite's sites: {name: {"scores", "trained"}, "seconds": ...}."""
    from fedmoe.shared.data import find_sites, load_conflict_eval, load_mixed_eval, load_site

    start = time.perf_counter()
    sites = [load_site(p) for p in find_sites(suite)]
    ctx = BaselineContext(model_dir, quant, sites, load_mixed_eval(suite), load_conflict_eval(suite), TrainConfig(**cfg),
                          tuple(ranks), progress=lambda text: print(text, file=sys.stderr, flush=True))
    out: dict = {name: BASELINES[name](ctx) for name in names}
    return out | {"seconds": time.perf_counter() - start}


class BaselineWorker:
    """`run_baselines(names)` in a fresh one-thread daemon process (it dies with `fedmoe
    simulate`, so a failed federation never waits on it); `result()` waits for it.
    `fedmoe simulate` runs one per baseline: their training is about equal (each site
    alone for the federation's steps; each domain pooled for as many steps as its sites)."""

    def __init__(self, model_dir, quant: str, suite, cfg: TrainConfig, names=tuple(BASELINES), ranks=(8,)):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_worker_main, args=(child, str(model_dir), quant, str(suite), asdict(cfg), tuple(names),
                                                                   tuple(ranks)),
                                   name=f"fedmoe-baselines-{'-'.join(names)}", daemon=True)
        self.process.start()
        child.close()

    def result(self) -> dict:
        try:
            status, payload = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise FedmoeError(f"the baselines worker died (exit code {self.process.exitcode})") from None
        finally:
            self._conn.close()
        self.process.join()
        if status != "ok":
            raise FedmoeError(f"baselines failed: {payload}")
        return payload

    def running(self) -> bool:
        return self.process.is_alive() and not self._conn.poll()

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


def _worker_main(conn, model_dir: str, quant: str, suite: str, cfg: dict, names: tuple[str, ...], ranks=(8,)) -> None:
    import os

    import torch

    torch.set_num_threads(1)
    # Nicer than the simulation's Ray actors (RAY_worker_niceness, 15): the federation and
    # then the MoE stage are the run's critical path; the baselines fill the cores they leave.
    os.nice(max(0, int(os.environ.get("RAY_worker_niceness", 15)) + 4 - os.nice(0)))
    try:
        conn.send(("ok", run_baselines(model_dir, quant, suite, cfg, names, ranks)))
    except Exception as exc:  # sent back whole: the parent reports it in one line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
