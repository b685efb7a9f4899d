"""One typed run configuration, four views: the Flower run config (and pyproject's
[tool.flwr.app.config]), the flags of `fedmoe simulate` / `fedmoe coordinator start`, and
simulate.json. Adding a field must reach all of them."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from pathlib import Path

import pytest

from fedmoe.server.federation.run_config import CODECS, FederationPlan, StrategyConfig, deployed_run_config
from fedmoe.shared.config import add_flags, apply_flags, from_flat, from_json, key_of, leaves, to_flat, to_json
from fedmoe.shared.errors import FedmoeError

ROOT = Path(__file__).resolve().parents[1]


def test_flat_view_round_trips_a_changed_plan():
    plan = FederationPlan(model_dir="/m", out_dir="/o", rounds=5, expected_nodes=3,
                          strategy=StrategyConfig(lr=0.01, privacy="secagg", clip=50.0, min_replies=2))
    flat = to_flat(plan)
    assert flat["rounds"] == 5 and flat["expected-sites"] == 3 and flat["model-path"] == "/m" and flat["clip"] == 50.0
    assert flat["epsilon-budget"] == ""  # None, as TOML can hold it
    back = from_flat(FederationPlan, flat)
    assert back == plan and back.strategy.epsilon_budget is None
    # values arrive as strings from a ConfigRecord or a command line: typed on the way in
    assert from_flat(FederationPlan, {"rounds": "7", "lr": "0.5", "resume": "true"}).rounds == 7


@pytest.mark.parametrize("flat, message", [
    ({"roundz": 3}, "unknown key 'roundz'"),
    ({"rounds": "three"}, "rounds: 'three' is not a valid int"),
    ({"local-steps": 2.5}, "local-steps: 2.5 is not a valid int"),
    ({"aggregation": "mean"}, "unknown aggregation 'mean'"),
])
def test_bad_run_config_is_one_line(flat, message):
    with pytest.raises(FedmoeError, match=message) as err:
        from_flat(FederationPlan, flat)
    assert "\n" not in str(err.value)


def test_pyproject_app_config_is_the_deployed_plan():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app == deployed_run_config()
    assert set(app) == {key_of(f) for _, f, _ in leaves(FederationPlan)}  # every field, nothing else


def flags_of(parser: argparse.ArgumentParser, command: list[str]) -> set[str]:
    sub = parser
    for name in command:
        action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
        sub = action.choices[name]
    return {s for a in sub._actions for s in a.option_strings}


def test_every_strategy_field_is_a_flag_of_simulate_and_coordinator():
    from fedmoe.shared.cli import build_parser

    parser = build_parser()
    simulate, coordinator = flags_of(parser, ["simulate"]), flags_of(parser, ["coordinator", "start"])
    for _, f, _ in leaves(StrategyConfig):
        if f.metadata.get("flag", True):
            assert f"--{key_of(f)}" in simulate, f.name
            assert f"--{key_of(f)}" in coordinator or key_of(f) == "single-expert", f.name
    assert {"--rounds", "--expected-sites", "--node-wait"} <= coordinator


def test_flags_change_only_what_was_given():
    p = argparse.ArgumentParser()
    add_flags(p, FederationPlan)
    base = FederationPlan(rounds=4, strategy=StrategyConfig(lr=0.2))
    got = apply_flags(base, p.parse_args(["--local-steps", "9", "--privacy", "secagg"]))
    assert got.strategy.local_steps == 9 and got.strategy.privacy == "secagg" and got.strategy.site_clip == 100.0
    assert got.rounds == 4 and got.strategy.lr == 0.2  # not given: kept
    with pytest.raises(SystemExit):  # argparse refuses a bad value with its usage line
        p.parse_args(["--local-steps", "x"])
    with pytest.raises(FedmoeError, match="min-replies must be >= 1"):  # the dataclass checks rerun
        apply_flags(base, p.parse_args(["--min-replies", "0"]))


def test_simulate_json_round_trips(tmp_path):
    from fedmoe.simulations.simulate import preset_run

    p = argparse.ArgumentParser()
    from fedmoe.simulations.simulate import SimulationRun

    add_flags(p, SimulationRun)
    run = apply_flags(preset_run("smoke"), p.parse_args(["--no-baselines", "--ranks", "4,8", "--clip", "3", "--lr", "0.1"]))
    assert run.options.baselines is False and run.options.ranks == (4, 8) and run.strategy.lr == 0.1
    assert run.strategy.local_steps == preset_run("smoke").strategy.local_steps  # the preset's, not the class default
    assert from_json(SimulationRun, to_json(run)) == run
    import json

    assert from_json(SimulationRun, json.loads(json.dumps(to_json(run)))) == run


def test_choices_agree_with_their_modules():
    from fedmoe.server.federation.privacy import MODES
    from fedmoe.shared.compression import CODECS as codecs

    assert CODECS == codecs
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(StrategyConfig)}
    assert set(choices["privacy"]) == set(MODES)
