"""Edge export (issue 7): an expert of a run as a peft adapter, a merged model, or an
ONNX model with KV cache that onnxruntime runs without torch.

Parity is checked on two architectures: the default tiny Llama and a random-weight
GPT-2, each with a LoRA expert whose B factors are random (a fresh adapter is zero, and
a zero adapter would hide a wrong merge).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmoe.shared.cli import main
from fedmoe.shared.modeling import attach_lora, load_adapter, load_base_model, model_fingerprint, save_adapter
from fedmoe.shared.runs import write_run_info

PROMPT_IDS = [40, 311, 95, 1200, 7, 560, 18, 903, 77, 1500, 64, 31]
LOGIT_ATOL = 1e-4  # fp32 onnxruntime vs torch; measured ~5e-6 (llama), ~3e-7 (gpt2)


def _make_run(base_dir: Path, run_dir: Path, expert: str, seed: int) -> Path:
    fp = model_fingerprint(base_dir)
    write_run_info(run_dir, model=str(base_dir), base_fingerprint=fp, domains=[expert])
    torch.manual_seed(seed)
    peft_model = attach_lora(load_base_model(base_dir, quant="none", device="cpu"), rank=4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    save_adapter(peft_model, run_dir / "experts" / expert, fp, domain=expert)
    return run_dir


def _gpt2_dir(tiny_model_dir: Path, out: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=2048, n_positions=128, n_embd=64, n_layer=2, n_head=4, initializer_range=0.1,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tiny_model_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("edge")
    gpt2 = _gpt2_dir(tiny_model_dir, root / "gpt2-base")
    return {
        "llama": (_make_run(tiny_model_dir, root / "run-llama", "medicine", seed=1), "medicine"),
        "gpt2": (_make_run(gpt2, root / "run-gpt2", "law", seed=2), "law"),
    }


@pytest.fixture(scope="module")
def onnx_dirs(runs, tmp_path_factory) -> dict[str, Path]:
    """One fp32 export per architecture through the CLI: the default (dynamo) exporter for
    the default model, the torchscript one for GPT-2 (both take the same path otherwise;
    dynamo on GPT-2 passes too but costs ~10 s of the test budget)."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for arch, (run, expert) in runs.items():
        out[arch] = root / arch
        exporter = ["--exporter", "torchscript"] if arch == "gpt2" else []
        assert main(["export", "--run", str(run), "--expert", expert, "--format", "onnx", "--out", str(out[arch]), *exporter]) == 0
    return out


def _peft_model(run: Path, expert: str):
    info = json.loads((run / "run.json").read_text())
    model = load_adapter(load_base_model(info["model"], quant="none", device="cpu"), run / "experts" / expert,
                         base_fingerprint=info["base_fingerprint"])
    return model.eval()


def _peft_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits.numpy()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_onnx_logits_and_greedy_tokens_match_peft(arch, runs, onnx_dirs):
    from fedmoe.shared.edge import EdgeModel

    run, expert = runs[arch]
    peft_model = _peft_model(run, expert)
    edge = EdgeModel(onnx_dirs[arch], threads=1)
    assert edge.meta["model_type"] == arch and edge.meta["expert"] == expert
    assert (onnx_dirs[arch] / "tokenizer.json").is_file()

    ref = _peft_logits(peft_model, PROMPT_IDS)
    got = edge.logits(PROMPT_IDS)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=LOGIT_ATOL, rtol=0)
    # The expert really is in the graph: the base model alone gives other logits.
    with peft_model.disable_adapter():
        base = _peft_logits(peft_model, PROMPT_IDS)
    assert np.abs(base - ref).max() > 100 * LOGIT_ATOL

    # Incremental decoding through the KV cache gives the same logits as one full pass.
    logits, past = edge.forward(np.array([PROMPT_IDS[:5]]), np.ones((1, 5)), edge.empty_cache())
    steps = [logits[0]]
    for i in range(5, len(PROMPT_IDS)):
        logits, past = edge.forward(np.array([[PROMPT_IDS[i]]]), np.ones((1, i + 1)), past)
        steps.append(logits[0])
    np.testing.assert_allclose(np.concatenate(steps), ref[0], atol=LOGIT_ATOL, rtol=0)

    # Greedy generation: identical tokens to peft's generate() on the unmerged adapter.
    new = 24
    ours = edge.generate_ids(PROMPT_IDS, max_new_tokens=new, stop_at_eos=False).token_ids
    peft_model.config.use_cache = True
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=torch.tensor([PROMPT_IDS]), attention_mask=torch.ones(1, len(PROMPT_IDS), dtype=torch.long),
                                     max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == theirs[0, len(PROMPT_IDS):].tolist()


def test_int8_is_smaller_and_close(runs, onnx_dirs, tmp_path):
    from fedmoe.shared.edge import EdgeModel
    from fedmoe.server.export import onnx_bytes, quantize_edge_dir

    # llama: quantize the fp32 export; gpt2: the CLI's --quantize int8 (with the torchscript exporter).
    quantize_edge_dir(onnx_dirs["llama"], tmp_path / "llama-int8")
    run, expert = runs["gpt2"]
    assert main(["export", "--run", str(run), "--expert", expert, "--format", "onnx", "--quantize", "int8",
                 "--exporter", "torchscript", "--out", str(tmp_path / "gpt2-int8")]) == 0
    for arch in ("llama", "gpt2"):
        q = EdgeModel(tmp_path / f"{arch}-int8", threads=1)
        assert q.meta["quantization"] == "int8"
        assert onnx_bytes(tmp_path / f"{arch}-int8" / "model.onnx") < 0.5 * onnx_bytes(onnx_dirs[arch] / "model.onnx")
        fp32 = EdgeModel(onnx_dirs[arch], threads=1).logits(PROMPT_IDS)[0]
        int8 = q.logits(PROMPT_IDS)[0]
        assert np.isfinite(int8).all()
        agree = (fp32.argmax(-1) == int8.argmax(-1)).mean()
        assert agree >= 0.75, f"{arch}: int8 top-1 agreement {agree:.2f}"
        assert len(q.generate_ids(PROMPT_IDS, max_new_tokens=8, stop_at_eos=False).token_ids) == 8


def test_sampling_is_seeded(onnx_dirs):
    from fedmoe.shared.edge import EdgeModel

    edge = EdgeModel(onnx_dirs["llama"], threads=1)
    a = edge.generate("the physician at the clinic", max_new_tokens=12, temperature=1.0, seed=3)
    b = edge.generate("the physician at the clinic", max_new_tokens=12, temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids and isinstance(a.text, str)


def test_edge_generate_cli_does_not_import_torch(onnx_dirs):
    code = (
        "import json, sys\n"
        "import fedmoe.client\n"
        "assert 'torch' not in sys.modules, 'import fedmoe.client pulled torch'\n"
        "from fedmoe.shared.cli import main\n"
        f"rc = main(['edge', 'generate', '--model', {str(onnx_dirs['llama'])!r}, 'the nurse at the ward', "
        "'--max-new-tokens', '8', '--json'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "print('HEAVY=' + json.dumps(heavy)); sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    heavy = json.loads(proc.stdout.split("HEAVY=")[1])
    assert heavy == []
    result = json.loads(proc.stdout.split("HEAVY=")[0])
    assert 1 <= result["new_tokens"] <= 8 and result["prompt_tokens"] > 0


def test_peft_and_merged_exports(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    run, expert = runs["llama"]
    assert main(["export", "--run", str(run), "--expert", expert, "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert main(["export", "--run", str(run), "--expert", expert, "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ref = _peft_logits(_peft_model(run, expert), PROMPT_IDS)
    np.testing.assert_allclose(_peft_logits(merged, PROMPT_IDS), ref, atol=LOGIT_ATOL, rtol=0)


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedmoe: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_requests_give_one_line_errors(runs, onnx_dirs, tmp_path, capsys):
    run, expert = runs["llama"]
    out = str(tmp_path / "out")
    _one_line_error(capsys, ["export", "--run", str(run), "--expert", "astrology", "--out", out], "astrology", "medicine")
    _one_line_error(capsys, ["export", "--run", str(tmp_path / "no-such-run"), "--expert", expert, "--out", out], "no-such-run")
    _one_line_error(capsys, ["export", "--run", str(run), "--expert", expert, "--format", "peft", "--quantize", "int8",
                             "--out", out], "--quantize")
    _one_line_error(capsys, ["export", "--run", str(run), "--expert", expert, "--out", str(onnx_dirs["llama"])], "not empty")
    _one_line_error(capsys, ["edge", "generate", "--model", str(tmp_path / "nowhere"), "hi"], "nowhere")
    _one_line_error(capsys, ["edge", "generate", "--model", str(run), "hi"], "edge.json")
    assert not (tmp_path / "out").exists()
