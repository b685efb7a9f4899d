"""Foundation: packaging (one namespace, one console script) and the CLI's error contract
(exit != 0, one line `fedmoe: error: ...` on stderr, no traceback unless --debug)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedmoe.shared.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def fedmoe_exe() -> list[str]:
    exe = shutil.which("fedmoe") or str(Path(sys.executable).with_name("fedmoe"))
    assert Path(exe).exists(), "the `fedmoe` console script is not installed (pip install -e .)"
    return [exe]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_fedmoe(args: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(fedmoe_exe() + args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every subcommand and sub-action, as argv prefixes."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, prefix + (name,))
    return paths


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("fedmoe: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- packaging ------------------------------------------------------------------------


def test_parser_has_the_foundation_commands():
    paths = set(command_paths(build_parser()))
    for expected in [("model", "pretrain"), ("eval",), ("train-local",), ("data", "make-suite"), ("bench", "memory")]:
        assert expected in paths, expected


def test_help_of_every_command_and_action(tmp_path):
    paths = command_paths(build_parser())
    assert len(paths) >= 7
    for path in paths:
        proc = run_fedmoe([*path, "--help"], cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, (path, proc.stderr)
        assert proc.stdout.startswith("usage: fedmoe"), (path, proc.stdout[:200])
        assert "Traceback" not in proc.stderr
        if path:
            assert path[-1] in proc.stdout.splitlines()[0]


def test_no_generic_top_level_modules_installed(tmp_path):
    code = (
        "import importlib.util, json\n"
        "names = ['server', 'client', 'shared', 'protos', 'simulations',\n"
        "         'fedmoe.server', 'fedmoe.client', 'fedmoe.shared', 'fedmoe.protos', 'fedmoe.simulations',\n"
        "         'fedmoe.simulations.benchmarks']\n"
        "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    for generic in ("server", "client", "shared", "protos", "simulations"):
        assert not found[generic], f"a top-level module named {generic!r} is importable outside the repo"
    for namespaced in ("fedmoe.server", "fedmoe.client", "fedmoe.shared", "fedmoe.protos", "fedmoe.simulations", "fedmoe.simulations.benchmarks"):
        assert found[namespaced], namespaced


def test_generated_protos_import_under_the_namespace(tmp_path):
    code = "import fedmoe.protos.lora_delta_pb2 as pb, sys; print(pb.LoraDelta.DESCRIPTOR.full_name); print('lora_delta_pb2' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["fedmoe.v1.LoraDelta", "False"]


# -- CLI errors -------------------------------------------------------------------------


def bad_site(root: Path, train_lines: list[str], domain: str = "medicine") -> Path:
    site = root / "bad-site"
    site.mkdir()
    (site / "site.toml").write_text(f'domain = "{domain}"\n')
    (site / "train.jsonl").write_text("\n".join(train_lines) + "\n")
    return site


GOOD = json.dumps({"prompt": "What is zorvat? Answer:", "completion": " kidney"})


def test_missing_data_folder_subprocess(tmp_path):
    missing = tmp_path / "no-such-site"
    proc = run_fedmoe(["train-local", "--data", str(missing), "--out", str(tmp_path / "a"), "--quant", "none"], cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, str(missing))
    assert not (tmp_path / "a").exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = run_fedmoe(["--debug", "eval", "--data", str(tmp_path / "nope.jsonl")], cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "FedmoeError" in proc.stderr


def test_missing_data_folder_in_process(tmp_path, capsys):
    rc = main(["train-local", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a"), "--quant", "none"])
    assert_one_line_error(rc, capsys.readouterr().err, "site data folder not found", "nowhere")
    rc = main(["eval", "--data", str(tmp_path / "nowhere.jsonl")])
    assert_one_line_error(rc, capsys.readouterr().err, "not found", "nowhere.jsonl")


def test_malformed_jsonl_names_the_line(tmp_path, capsys):
    site = bad_site(tmp_path, [GOOD, GOOD, '{"prompt": "x", "completion": ', GOOD])
    rc = main(["train-local", "--data", str(site), "--out", str(tmp_path / "a"), "--quant", "none"])
    assert_one_line_error(rc, capsys.readouterr().err, f"{site / 'train.jsonl'}:3", "malformed JSON")

    data = tmp_path / "eval.jsonl"
    data.write_text(GOOD + "\n\n" + GOOD + "\n[1, 2]\n")
    rc = main(["eval", "--data", str(data)])
    assert_one_line_error(rc, capsys.readouterr().err, f"{data}:4", "JSON object")


def test_site_without_domain(tmp_path, capsys):
    site = bad_site(tmp_path, [GOOD])
    (site / "site.toml").write_text('name = "x"\n')
    rc = main(["train-local", "--data", str(site), "--out", str(tmp_path / "a"), "--quant", "none"])
    assert_one_line_error(rc, capsys.readouterr().err, "site.toml", "domain")


def test_unknown_quantization(tmp_path, capsys, suite_dir):
    site = suite_dir / "site-00"
    rc = main(["train-local", "--data", str(site), "--out", str(tmp_path / "a"), "--quant", "fp3"])
    assert_one_line_error(rc, capsys.readouterr().err, "fp3", "nf4")
    rc = main(["eval", "--data", str(site), "--quant", "fp3"])
    assert_one_line_error(rc, capsys.readouterr().err, "fp3", "nf4")
    assert not (tmp_path / "a").exists()


def test_bad_rank_and_steps(tmp_path, capsys, suite_dir):
    site = suite_dir / "site-00"
    rc = main(["train-local", "--data", str(site), "--out", str(tmp_path / "a"), "--quant", "none", "--rank", "0"])
    assert_one_line_error(rc, capsys.readouterr().err, "rank")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_on_a_cpu_machine(capsys, suite_dir):
    rc = main(["eval", "--data", str(suite_dir / "site-00"), "--device", "cuda"])
    assert_one_line_error(rc, capsys.readouterr().err, "CUDA")


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Same architecture and tokenizer as the tiny model, re-initialised weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("other-base")
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    model.save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    from fedmoe.client.trainer import SiteTrainer
    from fedmoe.shared.modeling import save_adapter

    trainer = SiteTrainer(tiny_model_dir, quant="none", rank=4)
    return save_adapter(trainer.model, tmp_path_factory.mktemp("adapter") / "a", trainer.fingerprint, domain="medicine")


def test_adapter_for_another_base(tmp_path, other_model_dir, tiny_adapter, suite_dir):
    from fedmoe.shared.modeling import model_fingerprint

    proc = run_fedmoe(["eval", "--model", str(other_model_dir), "--adapter", str(tiny_adapter), "--data", str(suite_dir / "site-00")], cwd=tmp_path)
    line = assert_one_line_error(proc.returncode, proc.stderr, str(tiny_adapter), "made for base model")
    assert model_fingerprint(other_model_dir) in line
    assert proc.stdout == ""
