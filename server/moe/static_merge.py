"""Static merges of the experts into one adapter: the baselines the gates must beat.

Done as the model-merging field does them, on the full updates ΔW_k = s_k B_k A_k
(never on A and B separately: a sum of A's times a sum of B's mixes every expert's B
with every other expert's A), all through peft's `add_weighted_adapter`:

- `cat`: exactly Σ λ ΔW_k, as one adapter of rank Σ r_k (the factors stacked);
- `svd`: the same sum re-factorized by SVD at full rank Σ r_k, so also exact (equal
  to `cat` up to float error; kept because users know the name, and it now means that);
- `ties_svd`: TIES (trim to `density`, elect sign, disjoint mean; Yadav et al. 2023) on
  the ΔW_k, scaled by λ, re-factorized by SVD at rank Σ r_k;
- `dare_ties_svd`: DARE (drop at random, rescale by 1/density; Yu et al. 2024), then
  TIES, on the ΔW_k, scaled by λ, SVD at rank Σ r_k.

λ is one scalar per merge, the same for every expert, and TIES/DARE's density is one
too; both are chosen on validation data (`tune_static_merge`: the sites' own eval
records, never the mixed test set). The grids: λ ∈ {0.5, 1, 1.5, 2} / K for the sums
(1/K is the average expert), λ ∈ {0.5, 1, 1.5, 2} for TIES/DARE (their disjoint mean
already averages), density ∈ {0.3, 0.5, 0.7}.

The old `linear`, `ties` and `dare_ties` (peft's A/B-separate combinations) are gone.
"""

from __future__ import annotations

import itertools

from fedmoe.shared.errors import FedmoeError

LAMBDA_GRID = (0.5, 1.0, 1.5, 2.0)
DENSITY_GRID = (0.3, 0.5, 0.7)

# method -> peft combination_type, whether λ is divided by K (a sum), whether it has a density
STATIC_MERGES = {
    "cat": {"combination_type": "cat", "sum": True, "density": False},
    "svd": {"combination_type": "svd", "sum": True, "density": False},
    "ties_svd": {"combination_type": "ties_svd", "sum": False, "density": True},
    "dare_ties_svd": {"combination_type": "dare_ties_svd", "sum": False, "density": True},
}


def _spec(method: str) -> dict:
    if method not in STATIC_MERGES:
        raise FedmoeError(f"unknown static merge {method!r}: choose one of {', '.join(STATIC_MERGES)}")
    return STATIC_MERGES[method]


def default_params(method: str, experts: int) -> dict:
    """λ and density before tuning: the average expert for sums, λ 1 and density 0.5 for TIES/DARE."""
    spec = _spec(method)
    return {"lambda": 1.0 / max(1, experts) if spec["sum"] else 1.0} | ({"density": 0.5} if spec["density"] else {})


def param_grid(method: str, experts: int) -> list[dict]:
    spec = _spec(method)
    lambdas = [c / max(1, experts) for c in LAMBDA_GRID] if spec["sum"] else list(LAMBDA_GRID)
    densities = DENSITY_GRID if spec["density"] else (None,)
    return [{"lambda": lam} | ({"density": d} if d is not None else {}) for lam, d in itertools.product(lambdas, densities)]


def merged_rank(peft_model, experts: list[str]) -> int:
    return sum(int(peft_model.peft_config[e].r) for e in experts)


def add_static_merge(peft_model, experts: list[str], method: str, adapter_name: str | None = None,
                     params: dict | None = None, seed: int = 0) -> str:
    """Add the merge of `experts` as a new adapter on `peft_model`; returns its name.
    `params`: {"lambda": .., "density": ..} (defaults: `default_params`)."""
    import torch

    spec = _spec(method)
    if not experts:
        raise FedmoeError("no experts to merge")
    missing = [e for e in experts if e not in peft_model.peft_config]
    if missing:
        raise FedmoeError(f"static merge {method!r}: no adapter named {missing[0]!r} on the model")
    p = default_params(method, len(experts)) | dict(params or {})
    lam = float(p["lambda"])
    kwargs = {"combination_type": spec["combination_type"]}
    if spec["combination_type"] != "cat":
        kwargs["svd_rank"] = merged_rank(peft_model, experts)  # full rank: the sum is not truncated
    if spec["density"]:
        if not 0.0 < float(p["density"]) <= 1.0:
            raise FedmoeError(f"static merge {method!r}: density must be in (0, 1], got {p['density']}")
        kwargs["density"] = float(p["density"])
    name = adapter_name or f"static_{method}"
    if name in peft_model.peft_config:
        peft_model.delete_adapter(name)
    torch.manual_seed(seed)  # DARE drops at random
    try:
        peft_model.add_weighted_adapter(list(experts), [lam] * len(experts), name, **kwargs)
    except (ValueError, RuntimeError) as exc:
        raise FedmoeError(f"static merge {method!r} failed: {str(exc).splitlines()[0]}") from None
    return name


def tune_static_merge(served, name: str, validation_records: list, score_fn, seed: int = 0,
                      grid: list[dict] | None = None) -> tuple[dict, object]:
    """Grid-search λ (and density) for merge `name` on `validation_records`.

    `score_fn(adapter_name, records)` scores the merged adapter, higher is better (any
    comparable, e.g. (accuracy, -loss)). Only `validation_records` ever reach it: pass the
    sites' own eval records, not the test set. Returns (best params, its score); the
    merge is left off the model (add it again with those params).
    """
    if not validation_records:
        raise FedmoeError(f"static merge {name!r}: no validation records to tune on")
    model, experts = served.model, list(served.experts)
    best, best_score = None, None
    for params in grid or param_grid(name, len(experts)):
        adapter = add_static_merge(model, experts, name, adapter_name=f"static_{name}_tuning", params=params, seed=seed)
        try:
            score = score_fn(adapter, validation_records)
        finally:
            model.delete_adapter(adapter)
        if best_score is None or score > best_score:
            best, best_score = dict(params), score
    return best, best_score
