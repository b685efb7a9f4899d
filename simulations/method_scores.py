"""One method's numbers in `report.json`, the same way for every method.

A suite whose evaluation records carry `choices` (the WordNet / FOLDOC suites) is scored
as multiple choice, and its headline is `acc_norm` (lm-evaluation-harness's length-
normalized log-likelihood, `fedmoe.shared.multiple_choice`); exact match of greedy
decoding and completion loss stay beside it. A suite without choices (the synthetic one)
keeps exact match as its headline. Either way an entry is

    {"per_domain": {DOMAIN: headline}, "mixed": headline, "exact_match": ..., "acc": ...,
     "loss": ..., "conflict": headline on conflict-eval.jsonl, "conflict_per_domain": ...}

with the secondary fields present where they differ from the headline and the suite has
them. Scoring goes through `domain_scores(model, tokenizer, records, forward_kwargs_fn)`:
the gates' and experts' routing reaches both scorers through the same
`forward_kwargs_fn` that `evaluate` takes.
"""

from __future__ import annotations

from fedmoe.shared.data import Record
from fedmoe.shared.multiple_choice import choice_records, score_records
from fedmoe.shared.training import evaluate

METRICS = ("acc_norm", "acc", "exact_match", "loss")


def headline_metric(records: list[Record]) -> str:
    """acc_norm when every record carries choices; exact match otherwise (a partly
    multiple-choice suite would make the two headlines cover different records)."""
    return "acc_norm" if records and all(r.choices for r in records) else "exact_match"


def domain_scores(model, tokenizer, records: list[Record], forward_kwargs_fn=None) -> dict[str, dict]:
    """domain -> {"exact_match", "loss", "count"} plus {"acc", "acc_norm"} when the
    records carry choices."""
    if not records:
        return {}
    result = evaluate(model, tokenizer, records, forward_kwargs_fn=forward_kwargs_fn)
    out = {d: {"exact_match": v["accuracy"], "loss": v["loss"], "count": v["count"]} for d, v in result.per_domain.items()}
    if choice_records(records):
        mc = score_records(model, tokenizer, records, forward_kwargs_fn=forward_kwargs_fn)
        for d, v in mc.per_domain.items():
            out[d] |= {"acc": v["acc"], "acc_norm": v["acc_norm"]}
    return out


def with_conflict(mixed: dict[str, dict], conflict: dict[str, dict]) -> dict[str, dict]:
    """The mixed scores with each domain's conflict-set scores under "conflict"."""
    return {d: v | ({"conflict": conflict[d]} if d in conflict else {}) for d, v in mixed.items()}


def mean_scores(runs: list[dict]) -> dict:
    """The mean of several adapters' scores on the same records (local_only: a domain's
    sites), conflict scores included."""
    out = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0] if k not in ("count", "conflict")}
    out["count"] = runs[0]["count"]
    if all("conflict" in r for r in runs):
        out["conflict"] = mean_scores([r["conflict"] for r in runs])
    return out


def weighted(scores: dict[str, dict], metric: str) -> float | None:
    """The record-weighted mean over domains (= the score on all their records)."""
    if not scores or not all(metric in v for v in scores.values()):
        return None
    total = sum(v["count"] for v in scores.values())
    return sum(v[metric] * v["count"] for v in scores.values()) / total


def method_entry(scores: dict[str, dict], metric: str) -> dict:
    """A report.json method entry from per-domain scores (`domain_scores`, optionally
    `with_conflict`)."""
    entry: dict = {"per_domain": {d: v[metric] for d, v in scores.items()}, "mixed": weighted(scores, metric)}
    for name in METRICS:
        value = weighted(scores, name)
        if name != metric and value is not None:
            entry[name] = value
    conflict = {d: v["conflict"] for d, v in scores.items() if "conflict" in v}
    if conflict and weighted(conflict, metric) is not None:
        entry["conflict"] = weighted(conflict, metric)
        entry["conflict_per_domain"] = {d: v[metric] for d, v in conflict.items()}
    return entry
