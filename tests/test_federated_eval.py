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
