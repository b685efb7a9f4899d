"""Federated evaluation: each round's experts scored by the sites on their own eval splits.

After a round is aggregated, every expert's sites sampled that round (all of them at
fraction 1) get an EVALUATE message carrying the expert (sliced to the site's rank, as in TRAIN); each site scores it on its `eval.jsonl`
and replies with `num-examples`, `eval-accuracy` and `eval-loss` only (nothing else
leaves the site). The coordinator takes the example-weighted mean per expert; the
numbers go into the round's metrics (`eval_accuracy`, `eval_loss`, `eval_examples`),
committed with the round, which the dashboard's accuracy curves and report.json's
`curves` read. A site that fails to evaluate is left out of that round's mean: the
round itself never fails for it.

Under `--privacy dp` and `secagg` there is no federated evaluation: a site's accuracy and
loss on its own records are not covered by the clip and noise (or the masks), so the
sites do not send them (fedmoe.client.privacy.SitePolicy.check_evaluate refuses an
EVALUATE declared under those modes) and the coordinator does not ask. The config of
every EVALUATE declares the run's mode (`privacy`).
"""

from __future__ import annotations

import math

from flwr.app import Message, RecordDict

from fedmoe.server.federation.strategy import whole_number
from fedmoe.shared.errors import FedmoeError

from fedmoe.shared import compression


def eval_round_due(rnd: int, rounds: int, every: int) -> bool:
    """Every `every`-th round, and always the last one (so the curve ends at the final experts)."""
    return every > 0 and (rnd % every == 0 or rnd == rounds)


def evaluate_round(grid, strategy, rnd: int, send_round, progress=None, skip=frozenset()) -> dict[str, dict[str, float]]:
    """{expert: {"eval_accuracy", "eval_loss", "eval_examples"}} from the sites' replies;
    nodes in `skip` (those that failed this round) are not asked; {} under dp / secagg."""
    from fedmoe.shared.privacy_modes import METRICS_WITHHELD

    if strategy.privacy.mode in METRICS_WITHHELD:
        return {}
    sent = []
    for expert, nodes in strategy.groups().items():
        # the round's sampled sites (every site at fraction 1): a round's cost follows the
        # sites sampled, not the federation's size
        asked = [n for n in strategy.sample(nodes, rnd, expert) if n.node_id not in skip]
        adapters = strategy.adapters_by_rank(expert, (n.rank for n in asked))
        for node in asked:
            arrays, meta, _ = compression.encode(adapters[node.rank], "none")
            meta["expert"], meta["round"], meta["privacy"] = expert, rnd, strategy.privacy.mode
            msg = Message(RecordDict({"arrays": arrays, "config": meta}), dst_node_id=node.node_id, message_type="evaluate")
            sent.append((expert, node, msg))
    if not sent:
        return {}
    sums: dict[str, list[float]] = {}
    for (expert, node, _), reply in zip(sent, send_round(grid, sent, strategy.cfg.round_timeout)):
        if reply is None or reply.has_error():
            if progress:
                progress(f"round {rnd}: site {node.site} did not evaluate {expert}"
                         + (f" ({reply.error.reason[:200]})" if reply is not None else " (no reply)"))
            continue
        try:  # an untrusted reply: any malformed field drops that reply, never the round
            m = reply.content["metrics"]
            if m.get("num-examples", 0) == 0:  # a site without eval data
                continue
            where = f"round {rnd}: site {node.site} evaluating {expert}"
            n = whole_number(m.get("num-examples", 0), "num-examples", where, strategy.cfg.max_examples)
            acc, loss = float(m.get("eval-accuracy", float("nan"))), float(m.get("eval-loss", float("nan")))
            if not 0.0 <= acc <= 1.0 or not math.isfinite(loss):
                raise FedmoeError(f"{where}: accuracy {acc!r} or loss {loss!r} out of range")
        except Exception as exc:  # noqa: BLE001
            if progress:
                progress(f"evaluation reply left out: {str(exc)[:300]}")
            continue
        s = sums.setdefault(expert, [0.0, 0.0, 0.0])
        s[0], s[1], s[2] = s[0] + n * acc, s[1] + n * loss, s[2] + n
    return {e: {"eval_accuracy": a / n, "eval_loss": l / n, "eval_examples": n} for e, (a, l, n) in sums.items()}


def eval_curves(store) -> dict[str, list[dict]]:
    """report.json's `curves`: {expert: [{"round", "accuracy", "loss"}]} from the run store."""
    loss = {(m["round"], m["expert"]): m["value"] for m in store.metrics("eval_loss")}
    out: dict[str, list[dict]] = {}
    for m in store.metrics("eval_accuracy"):
        out.setdefault(m["expert"], []).append({"round": m["round"], "accuracy": m["value"],
                                                "loss": loss.get((m["round"], m["expert"]))})
    return out
