"""The sites' learning rate follows one warm-up + cosine curve across all rounds."""

from __future__ import annotations

import math

import pytest

from fedmoe.shared.errors import FedmoeError


def closed_form(lr: float, total: int, warmup: float, step: int) -> float:
    warm = round(warmup * total)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))


def test_lr_across_three_rounds_matches_the_closed_form(tiny_model_dir, suite_dir):
    """What the coordinator sends for rounds 1..3, applied by the site's trainer."""
    from fedmoe.client.jobs import train_config
    from fedmoe.client.trainer import SiteTrainer
    from fedmoe.server.federation.strategy import DomainExpertStrategy, Node, StrategyConfig
    from fedmoe.shared.data import find_sites, load_site
    from fedmoe.shared.modeling import adapter_spec_for, model_fingerprint

    rounds, steps, lr = 3, 5, 1e-3  # 15 steps: 2 of warm-up
    fp = model_fingerprint(tiny_model_dir)
    strategy = DomainExpertStrategy(StrategyConfig(local_steps=steps, lr=lr, batch_size=4), adapter_spec_for(tiny_model_dir),
                                    fp, rounds=rounds)
    node = Node(1, "site-00", "law", 8, fp, 10)
    site = load_site(find_sites(suite_dir)[0])
    trainer = SiteTrainer(tiny_model_dir, quant="none", rank=8)
    seen = []
    for rnd in range(1, rounds + 1):
        cfg = train_config(strategy.train_config(rnd, "law", node))
        assert (cfg.schedule, cfg.global_step, cfg.total_steps) == ("cosine", (rnd - 1) * steps, rounds * steps)
        seen += trainer.train(site.train[:8], cfg)[1].lrs
    expected = [closed_form(lr, rounds * steps, 0.1, g) for g in range(rounds * steps)]
    assert seen == pytest.approx(expected, rel=1e-9)
    assert seen[0] == pytest.approx(lr / 2) and max(seen) == pytest.approx(lr) and seen[-1] < 0.05 * lr  # warm-up, peak, decayed
    # Constant: --lr every step, and no schedule keys on the wire.
    flat = DomainExpertStrategy(StrategyConfig(local_steps=steps, lr=lr, lr_schedule="constant"), strategy.spec, fp, rounds=rounds)
    assert "lr-schedule" not in flat.train_config(2, "law", node)
    assert train_config(flat.train_config(2, "law", node)).schedule == "constant"


def test_bad_schedules_are_refused_in_one_line():
    from fedmoe.server.federation.strategy import StrategyConfig
    from fedmoe.shared.training import TrainConfig

    with pytest.raises(FedmoeError, match="unknown lr schedule 'linear'"):
        StrategyConfig(lr_schedule="linear")
    with pytest.raises(FedmoeError, match="unknown lr schedule"):
        TrainConfig(schedule="step")
    with pytest.raises(FedmoeError, match="warmup must be in"):
        TrainConfig(schedule="cosine", warmup=1.5)


def test_run_config_and_cli_carry_the_schedule():
    import tomllib
    from pathlib import Path

    from fedmoe.server.federation.coordinator import APP_CONFIG
    from fedmoe.server.federation.server_app import plan_from_run_config

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == APP_CONFIG
    assert APP_CONFIG["lr-schedule"] == "cosine" and APP_CONFIG["eval-every"] == 1
    plan = plan_from_run_config(APP_CONFIG | {"model-path": "x", "lr-schedule": "constant", "eval-every": 2})
    assert plan.strategy.lr_schedule == "constant" and plan.strategy.eval_every == 2
