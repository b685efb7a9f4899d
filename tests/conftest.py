"""Shared fixtures: the tiny default model (built once, cached under FEDMOE_HOME), a
generated suite, and one trained adapter per domain. Everything heavy is session-scoped
so the whole suite builds it once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see fedmoe/shared/__init__.py
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from fedmoe.shared.pretrain import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory) -> Path:
    from fedmoe.simulations.domain_suite import make_suite

    out = tmp_path_factory.mktemp("suite")
    make_suite(out, domains=4, sites=8, seed=0)
    return out


@pytest.fixture(scope="session")
def domain_adapters(tiny_model_dir, suite_dir, tmp_path_factory) -> dict[str, Path]:
    """One LoRA adapter per domain, trained locally (unquantized, for speed) on the
    domain's sites: stand-ins for federated experts in tests that need experts."""
    from fedmoe.client.trainer import SiteTrainer
    from fedmoe.shared.data import find_sites, load_site
    from fedmoe.shared.modeling import save_adapter
    from fedmoe.shared.training import TrainConfig

    out = tmp_path_factory.mktemp("adapters")
    sites = [load_site(p) for p in find_sites(suite_dir)]
    trainer = SiteTrainer(tiny_model_dir, quant="none", rank=8)
    adapters = {}
    for domain in sorted({s.domain for s in sites}):
        records = [r for s in sites if s.domain == domain for r in s.train]
        trainer.set_adapter(None)
        trainer.train(records, TrainConfig(steps=80, seed=0))
        adapters[domain] = save_adapter(trainer.model, out / domain, trainer.fingerprint, domain=domain)
    return adapters


@pytest.fixture(scope="session")
def served_run(tiny_model_dir, domain_adapters, suite_dir, tmp_path_factory):
    """A finished run as `fedmoe simulate` leaves it: run.json, experts/, gates/ (the
    trained domain adapters as experts, a prototype gate); for the serving tests."""
    import json
    import shutil

    from fedmoe.server.moe.gates import save_gate
    from fedmoe.simulations.moe_report import build_gates
    from fedmoe.server.moe.served_model import ServedModel
    from fedmoe.shared.data import find_sites, load_site
    from fedmoe.shared.modeling import model_fingerprint
    from fedmoe.shared.runs import write_run_info

    run = tmp_path_factory.mktemp("served-run")
    write_run_info(run, model=str(tiny_model_dir), base_fingerprint=model_fingerprint(tiny_model_dir),
                   domains=sorted(domain_adapters))
    for domain, path in domain_adapters.items():
        shutil.copytree(path, run / "experts" / domain)
    served = ServedModel(tiny_model_dir, {d: run / "experts" / d for d in sorted(domain_adapters)}, "cpu")
    sites = [load_site(p) for p in find_sites(suite_dir)]
    build_gates(served, sites, seed=0, gates=("prototype",))
    save_gate(served.gates["prototype"], run / "gates")
    (run / "gates" / "features.json").write_text(json.dumps(served.featurizer.cfg.as_dict()))
    return run


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, tiny_model_dir) -> Path:
    """One `fedmoe simulate --preset smoke` run (Flower Simulation Engine), shared by
    every test that needs a finished run folder."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("runs") / "smoke"
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    proc = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--preset", "smoke", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def fed_smoke_run(tmp_path_factory, tiny_model_dir) -> Path:
    """`fedmoe simulate --preset smoke --rounds 2 --no-baselines --no-moe --no-mia`: the
    federation alone, uninterrupted; the reference of the crash tests."""
    from fedmoe.simulations.benchmarks.resume import run_simulate, simulate_cmd

    out = tmp_path_factory.mktemp("runs") / "fed-smoke"
    r = run_simulate(simulate_cmd(out, rounds=2), timeout=900)
    assert r["returncode"] == 0, r["stderr"][-3000:]
    return out


@pytest.fixture
def flower_task_identity():
    """Flower stamps every Message with the run it belongs to; outside a run (unit tests
    of strategies and ClientApp handlers) we provide one, and restore it afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


# Tiers: `pytest -m "not slow"` is the development tier (under 5 minutes on 2 cores); the
# full suite (scripts/test.sh, CI) runs everything. A test is slow when it is marked so,
# or when it needs a whole simulated federation (the fixtures below start one each).
# (The dashboard and operator tests reach the smoke run through their own `run_dir` and
# are marked slow in their files.)
FEDERATION_FIXTURES = {"smoke_run", "fed_smoke_run"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if FEDERATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
