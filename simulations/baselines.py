"""Baselines for the report: each site alone (`local_only`) and pooled data per domain
(`centralized`).

They need nothing from the federation, so `fedmoe simulate` trains them in worker
processes (`BaselineWorker`, grouped by `worker_groups`) while the federation runs, at a
lower priority than the simulated sites: the federation and then the MoE stage are the
run's critical path, and the baselines fill the cores those leave. Every job is seeded,
so the numbers do not depend on how they overlap.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

from fedmoe.client.trainer import SiteTrainer
from fedmoe.shared.data import Record, Site
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.training import TrainConfig
from fedmoe.simulations.method_scores import domain_scores, mean_scores, with_conflict


def local_only(trainer: SiteTrainer, sites: list[Site], mixed: list[Record], cfg: TrainConfig, progress=None,
               conflict: list[Record] = ()) -> dict[str, dict]:
    """Each site trains alone with the federation's total local steps; each domain's
    scores (`method_scores.domain_scores`) are the mean over its sites' adapters on that
    domain's mixed (and conflict) records."""
    per_domain: dict[str, list[dict]] = {}
    for i, site in enumerate(sites):
        trainer.set_adapter(None)
        trainer.train(site.train, TrainConfig(**{**cfg.__dict__, "seed": cfg.seed + i}))
        per_domain.setdefault(site.domain, []).append(_scores(trainer, site.domain, mixed, conflict))
        if progress:
            progress(f"baseline local_only: {Path(site.path).name} ({site.domain}) {_headline(per_domain[site.domain][-1])} "
                     f"[{i + 1}/{len(sites)}]")
    return {d: mean_scores(v) for d, v in per_domain.items()}


def centralized(trainer: SiteTrainer, sites: list[Site], mixed: list[Record], cfg: TrainConfig, progress=None,
                conflict: list[Record] = ()) -> dict[str, dict]:
    """Upper bound: per domain, one adapter on the domain's pooled data (no federation),
    trained with as many steps as the federation spent on that domain."""
    out = {}
    for domain in sorted({s.domain for s in sites}):
        members = [s for s in sites if s.domain == domain]
        trainer.set_adapter(None)
        trainer.train([r for s in members for r in s.train], TrainConfig(**{**cfg.__dict__, "steps": cfg.steps * len(members)}))
        out[domain] = _scores(trainer, domain, mixed, conflict)
        if progress:
            progress(f"baseline centralized: {domain} {_headline(out[domain])}")
    return out


def _scores(trainer: SiteTrainer, domain: str, mixed: list[Record], conflict) -> dict:
    """The trainer's current adapter on one domain's mixed and conflict records."""
    mine = [r for r in mixed if r.domain == domain]
    scores = domain_scores(trainer.model, trainer.tokenizer, mine)[domain]
    clash = domain_scores(trainer.model, trainer.tokenizer, [r for r in conflict if r.domain == domain])
    return with_conflict({domain: scores}, clash)[domain]


def _headline(scores: dict) -> str:
    name = "acc_norm" if "acc_norm" in scores else "exact_match"
    return f"{name} {scores[name]:.3f}"


BASELINES = {"local_only": local_only, "centralized": centralized}
# A worker's start-up (imports, model load: ~10 s of CPU on 2 cores) pays for itself
# only with enough training behind it: measured, the smoke preset (96 steps a baseline)
# took 94 s with a worker per baseline vs 79 s with one; the default preset (960 steps a
# baseline) left the single worker 100 s behind the federation.
SPLIT_STEPS = 300


def worker_groups(sites: int, steps: int) -> list[tuple[str, ...]]:
    """The baselines each worker trains: one worker per baseline when each has at least
    SPLIT_STEPS steps of training, else one worker for both. Each trains sites x steps
    in all (local_only: `steps` per site; centralized: per domain, `steps` per member)."""
    return [(name,) for name in BASELINES] if sites * steps >= SPLIT_STEPS else [tuple(BASELINES)]


def run_baselines(model_dir: str, quant: str, suite: str, cfg: dict, names=tuple(BASELINES)) -> dict:
    """The named baselines on the suite's sites: {name: per-domain scores, "seconds": ...}."""
    from fedmoe.shared.data import find_sites, load_conflict_eval, load_mixed_eval, load_site

    start = time.perf_counter()
    sites = [load_site(p) for p in find_sites(suite)]
    mixed = load_mixed_eval(suite)
    conflict = load_conflict_eval(suite)
    trainer = SiteTrainer(model_dir, quant, 8)
    train_cfg = TrainConfig(**cfg)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    out: dict = {name: BASELINES[name](trainer, sites, mixed, train_cfg, say, conflict) for name in names}
    return out | {"seconds": time.perf_counter() - start}


class BaselineWorker:
    """`run_baselines(names)` in a fresh one-thread daemon process (it dies with `fedmoe
    simulate`, so a failed federation never waits on it); `result()` waits for it.
    `fedmoe simulate` runs one per baseline: their training is about equal (each site
    alone for the federation's steps; each domain pooled for as many steps as its sites)."""

    def __init__(self, model_dir, quant: str, suite, cfg: TrainConfig, names=tuple(BASELINES)):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_worker_main, args=(child, str(model_dir), quant, str(suite), asdict(cfg), tuple(names)),
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


def _worker_main(conn, model_dir: str, quant: str, suite: str, cfg: dict, names: tuple[str, ...]) -> None:
    import os

    import torch

    torch.set_num_threads(1)
    # Nicer than the simulation's Ray actors (RAY_worker_niceness, 15): the federation and
    # then the MoE stage are the run's critical path; the baselines fill the cores they leave.
    os.nice(max(0, int(os.environ.get("RAY_worker_niceness", 15)) + 4 - os.nice(0)))
    try:
        conn.send(("ok", run_baselines(model_dir, quant, suite, cfg, names)))
    except Exception as exc:  # sent back whole: the parent reports it in one line
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
