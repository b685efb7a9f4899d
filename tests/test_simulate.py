"""`fedmoe simulate --preset smoke`: a whole Flower simulation, its run store and report."""

import json
import sqlite3
import subprocess
import sys

import pytest

METHODS = ("base", "local_only", "fedavg_single", "centralized_single", "experts_oracle", "centralized", "centralized_pooled")


def test_report_has_every_method_with_fractions(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    assert report["preset"] == "smoke" and report["seed"] == 0
    for m in METHODS:
        entry = report["methods"][m]
        assert set(entry["per_domain"]) == set(report["domains"])
        assert 0.0 <= entry["mixed"] <= 1.0
        assert all(0.0 <= v <= 1.0 for v in entry["per_domain"].values())
    assert report["methods"]["base"]["mixed"] == 0.0  # the base cannot know the suite's facts
    for name in ("report.md", "accuracy.png", "loss.png", "run.json"):
        assert (smoke_run / name).stat().st_size > 0
    assert "experts_oracle" in (smoke_run / "report.md").read_text()
    # equal compute, said: the federation's depth for centralized, the summed site steps for _pooled
    trained = {m: report["methods"][m]["trained"] for m in ("local_only", "centralized", "centralized_pooled", "experts_oracle")}
    depth = report["rounds"] * report["local_steps"]
    assert trained["centralized"]["steps"] == depth == trained["local_only"]["steps"]
    assert str(depth) in trained["centralized_pooled"]["steps"] and "site" in trained["centralized_pooled"]["steps"]
    stages = report["stage_seconds"]
    # the smoke preset's baselines share one worker
    workers = ("baseline local_only + centralized + centralized_pooled + centralized_single (worker)",)
    assert {"federation", "scoring", "moe", *workers} <= set(stages) and all(v >= 0 for v in stages.values())
    assert sum(v for k, v in stages.items() if k not in workers) <= report["wall_seconds"]
    assert max(stages[w] for w in workers) <= report["wall_seconds"]


def test_baselines_in_their_worker_match_the_same_run_in_process(suite_dir, tiny_model_dir, tmp_path):
    """The worker process beside the federation gives the numbers the functions give here."""
    import shutil

    from fedmoe.shared.training import TrainConfig
    from fedmoe.simulations.baselines import BaselineWorker, run_baselines

    suite = tmp_path / "suite"
    for site in ("site-00", "site-01", "site-04", "site-05"):  # two domains, two sites each
        shutil.copytree(suite_dir / site, suite / site)
    shutil.copy(suite_dir / "mixed-eval.jsonl", suite / "mixed-eval.jsonl")
    domains = {json.loads(line)["domain"] for line in (suite_dir / "mixed-eval.jsonl").read_text().splitlines()}
    cfg = TrainConfig(steps=6, batch_size=8, seed=3)
    ranks = (4, 8)  # local_only trains each site at its own rank
    workers = [BaselineWorker(tiny_model_dir, "none", suite, cfg, names, ranks)
               for names in (("local_only", "centralized_single"), ("centralized", "centralized_pooled"))]
    try:
        here = run_baselines(str(tiny_model_dir), "none", str(suite), cfg.__dict__, ranks=ranks)
        there = [w.result() for w in workers]
    finally:
        for w in workers:
            w.stop()
    assert there[0]["local_only"] == here["local_only"] and there[1]["centralized"] == here["centralized"]
    assert there[0]["centralized_single"] == here["centralized_single"]
    assert there[1]["centralized_pooled"] == here["centralized_pooled"]
    assert "centralized" not in there[0] and "local_only" not in there[1]
    scores = {name: here[name]["scores"] for name in ("local_only", "centralized", "centralized_pooled", "centralized_single")}
    assert len({frozenset(v) for v in scores.values()}) == 1 and set(scores["local_only"]) < domains
    # equal compute: centralized at the federation's depth, _pooled at depth x the domain's 2 sites
    assert here["centralized"]["trained"]["steps"] == 6 and here["centralized_pooled"]["trained"]["steps"].startswith("6 x")


def test_run_store_committed_every_round(smoke_run):
    report = json.loads((smoke_run / "report.json").read_text())
    db = sqlite3.connect(smoke_run / "run.db")
    rounds = db.execute("SELECT round, state FROM rounds ORDER BY round").fetchall()
    assert rounds == [(r, "committed") for r in range(1, report["rounds"] + 1)]
    assert db.execute("SELECT state FROM run").fetchone()[0] == "finished"
    sites = db.execute("SELECT COUNT(*), COUNT(DISTINCT domain) FROM sites").fetchone()
    assert sites == (4, 2)
    ok, bytes_in, bytes_out = db.execute(
        "SELECT COUNT(*), SUM(bytes_in), SUM(bytes_out) FROM participation WHERE status = 'ok'").fetchone()
    assert ok == 2 * 4 * report["rounds"] and bytes_in > 0 and bytes_out > 0  # domain expert + single adapter per site
    ckpts = db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0]
    assert ckpts == report["rounds"] * (len(report["domains"]) + 1)


def test_experts_load_with_stock_peft(smoke_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    report = json.loads((smoke_run / "report.json").read_text())
    for domain in report["domains"]:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = PeftModel.from_pretrained(base, smoke_run / "experts" / domain)
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained, not the zero init


def test_simulate_refuses_to_overwrite_a_run(smoke_run):
    proc = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--preset", "smoke", "--out", str(smoke_run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fedmoe: error:") and "already holds a run" in proc.stderr
    assert (smoke_run / "report.json").exists()  # nothing already stored is lost


@pytest.mark.parametrize("args, message", [
    (["--data-dir", "/nonexistent/suite"], "suite folder not found"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--server-opt", "fedadam", "--privacy", "dp"], "breaks the frozen shared A of --privacy dp"),
    (["--privacy", "secagg", "--robust", "norm"], "--robust and --compression do not apply"),
    (["--chaos", "nan=2"], "chaos"),
])
def test_simulate_bad_input_one_line(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--out", str(tmp_path / "x"), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("fedmoe: error:") and message in lines[-1] and "Traceback" not in proc.stderr
    if "--data-dir" not in args:  # refused before anything is written to --out
        assert not (tmp_path / "x").exists()


def test_baselines_worker_failure_is_one_line(tmp_path, tiny_model_dir):
    from fedmoe.shared.errors import FedmoeError
    from fedmoe.shared.training import TrainConfig
    from fedmoe.simulations.baselines import BaselineWorker

    worker = BaselineWorker(tiny_model_dir, "none", tmp_path / "no-such-suite", TrainConfig(steps=1))
    with pytest.raises(FedmoeError, match="baselines failed: FedmoeError: suite folder not found"):
        worker.result()
    assert not worker.process.is_alive()


def test_baseline_workers_split_only_with_enough_training():
    from fedmoe.simulations.baselines import worker_groups
    from fedmoe.simulations.presets import PRESETS

    smoke, default = PRESETS["smoke"], PRESETS["default"]
    assert worker_groups(smoke.sites, smoke.local_steps * smoke.rounds) == [
        ("local_only", "centralized", "centralized_pooled", "centralized_single")]
    assert worker_groups(default.sites, default.local_steps * default.rounds) == [
        ("local_only", "centralized_single"), ("centralized_pooled", "centralized")]
