"""Exact LoRA aggregation: Σ p_k s_k B_k A_k from stacked factors, mixed ranks."""

import math

import pytest
import torch

from fedmoe.server.federation.aggregation import (dense_update, exact_lora_aggregate, initial_adapter, naive_lora_aggregate,
                                       to_site_delta)
from fedmoe.shared.delta import AdapterSpec, LoraDelta

MODULES = {"layer.0.q_proj": (24, 20), "layer.0.v_proj": (24, 12)}
SPEC = AdapterSpec(MODULES)


def random_delta(rank: int, seed: int, alpha: float | None = None) -> LoraDelta:
    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g)) for m, (i, o) in MODULES.items()}
    return LoraDelta.from_factors(factors, rank, alpha if alpha is not None else 2.0 * rank, "fp")


def dense(delta: LoraDelta, module: str) -> torch.Tensor:
    a, b = delta.factors(module)
    return delta.scaling * (b.double() @ a.double())


def test_exact_aggregate_equals_weighted_sum_of_products_with_mixed_ranks():
    updates = [(random_delta(4, 1), 10.0), (random_delta(8, 2, alpha=8.0), 30.0), (random_delta(16, 3), 60.0)]
    expert = exact_lora_aggregate(updates, max_rank=28)  # 4 + 8 + 16: nothing truncated
    for module in MODULES:
        want = sum(w / 100.0 * dense(d, module) for d, w in updates)
        got = dense_update(expert, module).double()
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_truncation_is_the_best_low_rank_approximation():
    updates = [(random_delta(8, s), 1.0) for s in range(4)]
    want = sum(0.25 * dense(d, "layer.0.q_proj") for d, _ in updates)
    u, s, vh = torch.linalg.svd(want)
    best8 = (u[:, :8] * s[:8]) @ vh[:8]
    got = dense_update(exact_lora_aggregate(updates, max_rank=8), "layer.0.q_proj").double()
    assert torch.allclose(got, best8, atol=1e-3)


def test_site_delta_reproduces_expert_at_each_rank_and_keeps_full_rank_sites_full():
    updates = [(random_delta(4, 1), 1.0), (random_delta(16, 2), 1.0)]
    expert = exact_lora_aggregate(updates, max_rank=16)
    init = initial_adapter(SPEC, 16, 32.0, "fp", seed=0)
    full = to_site_delta(expert, 16, 32.0, "fp", init)
    small = to_site_delta(expert, 4, 8.0, "fp", LoraDelta.from_factors(
        {m: (init.factors(m)[0][:4], init.factors(m)[1][:, :4]) for m in init.modules()}, 4, 8.0, "fp"))
    for m in MODULES:
        target = dense_update(expert, m).double()
        assert torch.allclose(dense(full, m), target, atol=1e-4)
        err_small = (dense(small, m) - target).norm() / target.norm()
        assert 0 < err_small < 1  # rank 4 is a truncation, not a collapse of the rank-16 site
    full.validate(SPEC, "fp")


def test_naive_fedit_differs_from_exact():
    updates = [(random_delta(8, 1), 1.0), (random_delta(8, 2), 1.0)]
    exact = exact_lora_aggregate(updates, max_rank=16)
    naive = naive_lora_aggregate(updates)
    m = "layer.0.q_proj"
    want = sum(0.5 * dense(d, m) for d, _ in updates)
    assert torch.allclose(dense_update(exact, m).double(), want, atol=1e-4)
    assert not torch.allclose(dense_update(naive, m).double(), want, atol=1e-2)


def test_naive_equals_mean_of_factors_for_equal_ranks():
    d1, d2 = random_delta(8, 1), random_delta(8, 2)
    naive = naive_lora_aggregate([(d1, 1.0), (d2, 3.0)])
    m = "layer.0.v_proj"
    a = 0.25 * d1.factors(m)[0] + 0.75 * d2.factors(m)[0]
    b = 0.25 * d1.factors(m)[1] + 0.75 * d2.factors(m)[1]
    assert torch.allclose(dense_update(naive, m), d1.scaling * b @ a, atol=1e-4)


def test_zero_expert_gives_trainable_start():
    init = initial_adapter(SPEC, 8, 16.0, "fp", seed=0)
    zero = exact_lora_aggregate([(LoraDelta.from_factors({m: (torch.zeros(8, i), torch.zeros(o, 8)) for m, (i, o) in MODULES.items()}, 8, 16.0, "fp"), 1.0)], 8)
    site = to_site_delta(zero, 8, 16.0, "fp", init)
    for m in MODULES:
        a, b = site.factors(m)
        assert torch.equal(a, init.factors(m)[0]) and b.abs().sum() == 0


def test_initial_adapter_is_seeded():
    a = initial_adapter(SPEC, 4, 8.0, "fp", seed=3)
    b = initial_adapter(SPEC, 4, 8.0, "fp", seed=3)
    c = initial_adapter(SPEC, 4, 8.0, "fp", seed=4)
    assert a.checksum() == b.checksum() != c.checksum()
    assert math.isclose(float(a.factors("layer.0.q_proj")[0].abs().max()), 1 / math.sqrt(24), rel_tol=0.1)


def test_empty_updates_rejected():
    with pytest.raises(ValueError):
        exact_lora_aggregate([], 4)
