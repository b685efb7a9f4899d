"""`fedmoe eval` and lm-evaluation-harness give the same acc and acc_norm on the same
records (the exported task, `lm-eval --model hf`). Installs nothing: skipped without
`lm_eval` (the `test` extra has it) or without WordNet."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmoe.shared.cli import main
from fedmoe.shared.data import write_jsonl

pytest.importorskip("lm_eval")


@pytest.mark.slow
def test_lm_eval_agrees_with_fedmoe_eval(tiny_model_dir, tmp_path):
    from fedmoe.simulations.wordnet_suite import DEFAULT_DIR, make_wordnet_suite

    if not Path(DEFAULT_DIR, "data.noun").exists():
        pytest.skip("wordnet-base not installed")
    make_wordnet_suite(tmp_path / "suite", ["law", "medicine", "computing"], 2, seed=3, terms_per_domain=20)
    rows = [json.loads(line) for line in (tmp_path / "suite" / "mixed-eval.jsonl").read_text().splitlines()][:48]
    write_jsonl(tmp_path / "mc.jsonl", rows)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "mc.jsonl"), "--device", "cpu",
                     "--export-lm-eval", str(tmp_path / "task"), "--json"]) == 0
    ours = json.loads(buf.getvalue())["multiple_choice"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf",
                           "--model_args", f"pretrained={tiny_model_dir},dtype=float32", "--include_path", str(tmp_path / "task"),
                           "--tasks", "fedmoe_mc", "--device", "cpu", "--batch_size", "64",
                           "--output_path", str(tmp_path / "lm-out")], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next((tmp_path / "lm-out").rglob("results_*.json")).read_text())["results"]["fedmoe_mc"]
    assert ours["count"] == len(rows)
    assert abs(result["acc,none"] - ours["acc"]) <= 0.005
    assert abs(result["acc_norm,none"] - ours["acc_norm"]) <= 0.005
