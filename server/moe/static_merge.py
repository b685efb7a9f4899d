"""Static merges of the experts into one adapter: the baselines the gates must beat.

All four are peft's `add_weighted_adapter` on the served model's experts:
`linear` (weighted sum of the A and B factors), `ties` (trim, elect sign, disjoint
mean), `dare_ties` (random drop and rescale, then TIES), `svd` (weighted sum of the
full updates B A, re-factorized by SVD to the experts' rank). Weights: 1/K each for
the sums (`linear`, `svd`: the average expert), 1 each for TIES/DARE, whose disjoint
merge already averages; density 0.5.
"""

from __future__ import annotations

from fedmoe.shared.errors import FedmoeError

STATIC_MERGES = {
    "linear": {"combination_type": "linear", "weight": "mean"},
    "ties": {"combination_type": "ties", "weight": "one", "density": 0.5},
    "dare_ties": {"combination_type": "dare_ties", "weight": "one", "density": 0.5},
    "svd": {"combination_type": "svd", "weight": "mean"},
}


def add_static_merge(peft_model, experts: list[str], method: str, adapter_name: str | None = None,
                     weights: list[float] | None = None, seed: int = 0) -> str:
    """Add the merge of `experts` as a new adapter on `peft_model`; returns its name."""
    import torch

    if method not in STATIC_MERGES:
        raise FedmoeError(f"unknown static merge {method!r}: choose one of {', '.join(STATIC_MERGES)}")
    if not experts:
        raise FedmoeError("no experts to merge")
    spec = dict(STATIC_MERGES[method])
    name = adapter_name or f"static_{method}"
    if weights is None:
        weights = [1.0 / len(experts)] * len(experts) if spec.pop("weight") == "mean" else [1.0] * len(experts)
    else:
        spec.pop("weight")
    if name in peft_model.peft_config:
        peft_model.delete_adapter(name)
    torch.manual_seed(seed)  # DARE drops at random
    try:
        peft_model.add_weighted_adapter(list(experts), list(weights), name, **spec)
    except ValueError as exc:
        raise FedmoeError(f"static merge {method!r} failed: {str(exc).splitlines()[0]}") from None
    return name
