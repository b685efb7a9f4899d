"""Foundation: `fedmoe train-local` on a suite site (NF4 base) learns the site's facts,
saves a standard peft adapter, and `fedmoe eval --json` reports per-domain accuracy."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from fedmoe.shared.cli import main
from fedmoe.shared.data import Record, load_site
from fedmoe.shared.errors import FedmoeError


def run_json(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    assert rc == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def site(suite_dir) -> Path:
    return suite_dir / "site-00"


@pytest.fixture(scope="module")
def trained(site, tmp_path_factory) -> tuple[Path, dict]:
    adapter = tmp_path_factory.mktemp("train-local") / "adapter"
    summary = run_json(["train-local", "--data", str(site), "--out", str(adapter), "--quant", "nf4", "--steps", "60", "--json"])
    return adapter, summary


def test_train_local_learns_the_site(trained, site):
    adapter, s = trained
    domain = load_site(site).domain
    assert s["domain"] == domain and s["quant"] == "nf4" and s["nf4_layers"] is True
    assert s["steps"] == 60 and s["rank"] == 8 and s["tokens_per_second"] > 0
    assert s["eval_accuracy_before"] <= 0.05  # the base cannot know made-up facts
    assert s["eval_accuracy_after"] >= 0.3
    assert s["eval_accuracy_after"] - s["eval_accuracy_before"] >= 0.25
    assert s["final_loss"] < 1.0
    meta = json.loads((adapter / "fedmoe_adapter.json").read_text())
    assert meta["domain"] == domain and meta["quant"] == "nf4" and meta["base_fingerprint"].startswith("sha256:")


def test_adapter_loads_with_stock_peft(trained, site, tiny_model_dir):
    """The NF4-trained adapter is a plain peft adapter: stock transformers + peft load it
    on the full-precision base, and it still knows the site's facts there."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedmoe.shared.training import evaluate

    adapter, s = trained
    cfg = PeftConfig.from_pretrained(str(adapter))
    assert cfg.r == 8 and set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter)).eval()
    result = evaluate(model, tok, load_site(site).eval)
    assert result.accuracy >= 0.3
    assert abs(result.accuracy - s["eval_accuracy_after"]) <= 0.2  # nf4 vs full-precision base


def test_eval_json_reports_per_domain_accuracy(trained, site):
    adapter, s = trained
    domain = load_site(site).domain
    base = run_json(["eval", "--data", str(site), "--json"])
    tuned = run_json(["eval", "--data", str(site), "--adapter", str(adapter), "--json"])
    for r in (base, tuned):
        assert set(r) >= {"accuracy", "loss", "count", "per_domain", "model", "adapter"}
        assert list(r["per_domain"]) == [domain]
        assert r["per_domain"][domain]["count"] == r["count"] == len(load_site(site).eval)
        assert 0.0 <= r["per_domain"][domain]["accuracy"] <= 1.0
    assert tuned["adapter"] == str(adapter) and base["adapter"] is None
    assert base["per_domain"][domain]["accuracy"] <= 0.05
    assert tuned["per_domain"][domain]["accuracy"] >= 0.3
    assert tuned["per_domain"][domain]["loss"] < base["per_domain"][domain]["loss"]


def test_eval_json_on_the_mixed_set(trained, suite_dir, site):
    """On mixed-eval.jsonl every domain gets its own row; the adapter helps its own."""
    adapter, _ = trained
    domain = load_site(site).domain
    r = run_json(["eval", "--data", str(suite_dir / "mixed-eval.jsonl"), "--adapter", str(adapter), "--json"])
    assert set(r["per_domain"]) == {"medicine", "law", "finance", "telecom"}
    assert sum(d["count"] for d in r["per_domain"].values()) == r["count"]
    own = r["per_domain"][domain]["accuracy"]
    assert own >= 0.2
    assert all(own > d["accuracy"] for name, d in r["per_domain"].items() if name != domain)


def test_eval_text_table(trained, site, capsys):
    adapter, _ = trained
    assert main(["eval", "--data", str(site), "--adapter", str(adapter)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["domain", "accuracy", "loss", "n"]
    assert out[-1].split()[0] == "all" and len(out) == 3


def test_train_lora_rejects_nothing_to_do(tiny_model_dir):
    from fedmoe.shared.modeling import load_base_model, load_tokenizer
    from fedmoe.shared.training import TrainConfig, evaluate, train_lora

    model = load_base_model(tiny_model_dir, "none")
    tok = load_tokenizer(tiny_model_dir)
    rec = [Record("Q? Answer:", " yes")]
    model.requires_grad_(False)
    with pytest.raises(FedmoeError, match="no trainable parameters"):
        train_lora(model, tok, rec, TrainConfig(steps=1))
    with pytest.raises(FedmoeError, match="no training records"):
        train_lora(model, tok, [], TrainConfig(steps=1))
    with pytest.raises(FedmoeError, match="no evaluation records"):
        evaluate(model, tok, [])
    from fedmoe.shared.modeling import attach_lora

    peft_model = attach_lora(model, rank=2)
    for cfg in (TrainConfig(steps=0), TrainConfig(steps=2, batch_size=0)):
        with pytest.raises(FedmoeError, match="must be >= 1"):
            train_lora(peft_model, tok, rec, cfg)


def test_exact_match_is_greedy_decoding(trained, tiny_model_dir, site):
    """The one-pass exact match agrees with actual greedy generation."""
    from fedmoe.shared.modeling import load_adapter, load_base_model, load_tokenizer
    from fedmoe.shared.training import evaluate

    tok = load_tokenizer(tiny_model_dir)
    model = load_adapter(load_base_model(tiny_model_dir, "none"), trained[0])
    records = load_site(site).eval[:12]
    hits = []
    for r in records:
        ids = tok(r.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        want = tok(r.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(want), do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=None)
        hits.append(out[0, ids.shape[1]:].tolist() == want)
    result = evaluate(model, tok, records)
    assert result.accuracy == pytest.approx(sum(hits) / len(hits))
    assert 0 < sum(hits)  # the adapter answers some of them


def test_completion_logits_match_the_full_forward(tiny_model_dir, site):
    """A left-padded batch with the LM head on the completion positions only gives the
    loss and exact-match verdicts of the plain right-padded forward over every position,
    for prompt/completion and text records alike, on an NF4 base with LoRA."""
    from fedmoe.shared.modeling import attach_lora, load_base_model, load_tokenizer
    from fedmoe.shared.training import collate, completion_logits, encode_record, pads_left, score_batch

    tok = load_tokenizer(tiny_model_dir)
    model = attach_lora(load_base_model(tiny_model_dir, "nf4"), rank=4)
    assert pads_left(model)
    records = load_site(site).train[:12] + [Record("", "the baker sells bread in the morning")]
    encoded = [encode_record(tok, r, 128) for r in records]
    right = collate(encoded, tok.pad_token_id, "cpu")
    left = collate(encoded, tok.pad_token_id, "cpu", left=True)
    assert (left["input_ids"][:, -1] != tok.pad_token_id).all()  # every record ends at the last position
    with torch.no_grad():
        reference = model(**right).loss
        logits, labels = completion_logits(model, left)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
        ok_right, loss_right = score_batch(model, right)
        ok_left, loss_left = score_batch(model, left)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.equal(ok_left, ok_right)
    assert torch.allclose(loss_left, loss_right, atol=1e-5)
    prompt_only = collate(encoded[:12], tok.pad_token_id, "cpu", left=True)
    assert completion_logits(model, prompt_only)[0].shape[1] < prompt_only["input_ids"].shape[1] // 2
