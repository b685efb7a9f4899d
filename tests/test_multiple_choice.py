"""Multiple-choice scoring (acc, acc_norm as lm-evaluation-harness computes them) on the tiny model."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from fedmoe.shared.cli import main
from fedmoe.shared.data import Record, write_jsonl
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.multiple_choice import ChoiceScores, score_records, summarize

ANSWERS = [" a judgment of not guilty", " a written sworn statement", " money lent at interest", " a bone of the inner ear"]
PROMPTS = ["In a court ruling, what does acquittal mean? Answer:", "In a statute, what does affidavit mean? Answer:",
           "In a bank memo, what does loan mean? Answer:", "In a patient chart, what does stapes mean? Answer:"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from fedmoe.shared.modeling import load_base_model, load_tokenizer

    return load_base_model(tiny_model_dir, "none", "cpu"), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def trained(model_and_tokenizer):
    """A LoRA trained on the four (prompt, answer) pairs."""
    from fedmoe.shared.modeling import attach_lora
    from fedmoe.shared.training import TrainConfig, train_lora

    model, tok = model_and_tokenizer
    peft_model = attach_lora(model, rank=8)
    train_lora(peft_model, tok, [Record(p, a) for p, a in zip(PROMPTS, ANSWERS)], TrainConfig(steps=60, batch_size=4, lr=1e-2))
    yield peft_model, tok
    peft_model.unload()


def mc(prompt: str, right: str, choices: list[str], domain: str = "law") -> Record:
    return Record(prompt, right, domain, tuple(choices))


def test_trained_completion_wins_and_shuffled_does_not(trained):
    model, tok = trained
    right = [mc(p, a, ANSWERS) for p, a in zip(PROMPTS, ANSWERS)]
    shuffled = [mc(p, ANSWERS[(i + 1) % 4], ANSWERS) for i, p in enumerate(PROMPTS)]
    assert score_records(model, tok, right, batch_size=5).acc == 1.0  # batches cut across records
    assert score_records(model, tok, shuffled, batch_size=16).acc == 0.0


def test_acc_and_acc_norm_differ_when_lengths_differ():
    # loglik -4 over 2 chars (-2/char) vs -6 over 12 chars (-0.5/char): raw picks the short one, normalized the long one
    scores = ChoiceScores([[-4.0, -6.0]], [1], ["law"], [(" a", " a long gloss")])
    result = summarize(scores)
    assert (result.acc, result.acc_norm) == (0.0, 1.0)
    assert result.per_domain["law"] == {"acc": 0.0, "acc_norm": 1.0, "count": 1}


def test_logliks_agree_with_a_direct_per_choice_loss(model_and_tokenizer):
    model, tok = model_and_tokenizer
    choices = [" short", " a much longer gloss here", " mid length one"]
    record = mc(PROMPTS[0], choices[1], choices)
    scores = score_records(model, tok, [record, mc(PROMPTS[1], choices[0], choices)], batch_size=4).scores
    for choice, got in zip(choices, scores.logliks[0]):
        p = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
        c = tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0].float()
        nll = torch.nn.functional.cross_entropy(logits[len(p) - 1 : -1], torch.tensor(c), reduction="sum")
        assert got == pytest.approx(-float(nll), abs=1e-3)


def test_records_without_choices_are_an_error(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(FedmoeError, match="no multiple-choice records"):
        score_records(model, tok, [Record("p", " c")])


def test_eval_reports_acc_and_acc_norm_and_exports_an_lm_eval_task(tiny_model_dir, tmp_path):
    data = tmp_path / "mc.jsonl"
    write_jsonl(data, [{"prompt": p, "completion": a, "choices": ANSWERS, "domain": "law"} for p, a in zip(PROMPTS, ANSWERS)])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--device", "cpu",
                     "--export-lm-eval", str(tmp_path / "task"), "--json"]) == 0
    out = json.loads(buf.getvalue())
    assert set(out["multiple_choice"]) >= {"acc", "acc_norm", "count", "per_domain"}
    assert out["multiple_choice"]["count"] == 4 and "accuracy" in out  # exact match stays, secondary
    yaml = (tmp_path / "task" / "fedmoe_mc.yaml").read_text()
    assert "dataset_path: json" in yaml and "output_type: multiple_choice" in yaml
    rows = [json.loads(line) for line in (tmp_path / "task" / "fedmoe_mc.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == [0, 1, 2, 3]


def test_choices_must_contain_the_completion(tmp_path):
    from fedmoe.shared.data import read_jsonl

    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": " x", "choices": [" a", " b"]}])
    with pytest.raises(FedmoeError, match="not one of the 'choices'"):
        read_jsonl(tmp_path / "bad.jsonl")
