"""Per-round federated evaluation: the sites score every expert on their own eval split
each round (Flower EVALUATE), and the run store holds the example-weighted means."""

from __future__ import annotations

import json


def test_each_round_has_one_eval_row_per_expert(fed_smoke_run):
    from fedmoe.server.federation.evaluation import eval_curves
    from fedmoe.server.federation.run_store import RunStore

    store = RunStore(fed_smoke_run, readonly=True)
    try:
        rounds = store.last_committed_round()
        experts = sorted({m["expert"] for m in store.metrics("train_loss")})
        for name in ("eval_accuracy", "eval_loss", "eval_examples"):
            rows = store.metrics(name)
            assert sorted((m["round"], m["expert"]) for m in rows) == [(r, e) for r in range(1, rounds + 1) for e in experts], name
        assert all(0.0 <= m["value"] <= 1.0 for m in store.metrics("eval_accuracy"))
        assert all(m["value"] >= 0.0 for m in store.metrics("eval_loss"))
        assert all(m["value"] > 0 for m in store.metrics("eval_examples"))
        curves = eval_curves(store)
    finally:
        store.close()
    assert sorted(curves) == experts and all(len(c) == rounds for c in curves.values())
    assert all(set(p) == {"round", "accuracy", "loss"} for c in curves.values() for p in c)
    json.dumps(curves)


def test_eval_schedule():
    from fedmoe.server.federation.evaluation import eval_round_due

    assert [r for r in range(1, 8) if eval_round_due(r, 7, 1)] == list(range(1, 8))
    assert [r for r in range(1, 8) if eval_round_due(r, 7, 3)] == [3, 6, 7]
    assert not any(eval_round_due(r, 7, 0) for r in range(1, 8))


def test_a_site_scores_a_multiple_choice_eval_split_by_acc_norm(tmp_path, tiny_model_dir):
    """On a suite with choices the sites' per-round accuracy is acc_norm (exact match of a
    whole gloss is ~0 on real definitions, which would make the curves flat)."""
    from fedmoe.client import site as site_mod
    from fedmoe.shared.data import load_site, write_jsonl
    from fedmoe.shared.multiple_choice import score_records

    choices = [" a court of law", " a kind of fish", " the red planet", " a tall tree"]
    evals = [{"prompt": f"Question {i}: what is it? Answer:", "completion": choices[i % 4], "choices": choices}
             for i in range(6)]
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q? Answer:", "completion": " a court of law"}])
    write_jsonl(tmp_path / "eval.jsonl", evals)
    (tmp_path / "site.toml").write_text('domain = "law"\n')
    settings = site_mod.SiteSettings(str(tmp_path), quant="none", rank=4, model_path=str(tiny_model_dir))
    trainer = site_mod.trainer_for(settings)
    trainer.set_adapter(None)
    delta = trainer.current_delta()
    reply = site_mod.evaluate(settings, delta)
    expected = score_records(trainer.model, trainer.tokenizer, load_site(tmp_path).eval).acc_norm
    exact = trainer.evaluate(load_site(tmp_path).eval).accuracy
    assert reply["num-examples"] == 6
    assert reply["eval-accuracy"] == expected != exact  # acc_norm, not exact match
