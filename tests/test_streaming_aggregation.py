"""Streaming exact aggregation (randomized range finder) against the dense truncated SVD."""

import pytest
import torch

from fedmoe.server.federation import aggregation
from fedmoe.server.federation.aggregation import dense_update, exact_lora_aggregate, naive_lora_aggregate
from fedmoe.server.federation.streaming_aggregation import naive_lora_aggregate_stream, streaming_lora_aggregate
from fedmoe.shared.delta import LoraDelta

MODULES = {"l.0.q_proj": (48, 40), "l.0.v_proj": (48, 24)}


def site(rank: int, seed: int, decay: float = 0.0) -> LoraDelta:
    """Random factors. `decay` > 0: every site's update is a shared direction (components
    scaled by (1 - decay)^i) plus a little site-specific noise, so the sum has a
    decaying spectrum with a gap after `rank`, like sites of one domain."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for j, (m, (i, o)) in enumerate(MODULES.items()):
        a, b = torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g)
        if decay:
            shared = torch.Generator().manual_seed(1000 + j)
            scale = torch.tensor([(1 - decay) ** c for c in range(rank)])[:, None]
            a = scale * torch.randn(rank, i, generator=shared) + 0.02 * a
            b = torch.randn(o, rank, generator=shared) + 0.02 * b
        factors[m] = (a, b)
    return LoraDelta.from_factors(factors, rank, 2.0 * rank, "fp")


def dense_sum(updates, module):
    total = sum(w for _, w in updates)
    return sum(w / total * d.scaling * (d.factors(module)[1].double() @ d.factors(module)[0].double()) for d, w in updates)


def best(w: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_exact_when_the_sketch_covers_the_whole_rank():
    updates = [(site(4, 1), 1.0), (site(8, 2), 3.0), (site(4, 3), 2.0)]  # Σr = 16 <= max_rank + oversample
    got = streaming_lora_aggregate(updates, max_rank=16, oversample=8, power_iters=0)
    for m in MODULES:
        want = dense_sum(updates, m)
        assert torch.allclose(dense_update(got, m).double(), want, atol=1e-4 * want.abs().max())


@pytest.mark.parametrize("power_iters", [1, 2])
def test_truncated_sum_matches_dense_truncated_svd(power_iters):
    updates = [(site(8, s, decay=0.3), float(1 + s % 3)) for s in range(12)]  # Σr = 96 > 24 columns sketched
    got = streaming_lora_aggregate(updates, max_rank=8, oversample=8, power_iters=power_iters, dtype=torch.float64)
    for m in MODULES:
        want = dense_sum(updates, m)
        target = best(want, 8)
        err = (dense_update(got, m).double() - target).norm() / target.norm()
        assert err < 1e-3, err
        # and it is as good an approximation of the sum as the optimum, to 1e-6 relative
        opt = (want - target).norm()
        assert (want - dense_update(got, m).double()).norm() <= opt * (1 + 1e-6) + 1e-9


def test_same_output_type_and_order_as_stacked_qr():
    updates = [(site(8, s, decay=0.3), 1.0) for s in range(3)]
    qr = exact_lora_aggregate(updates, max_rank=8)
    st = streaming_lora_aggregate(updates, max_rank=8, power_iters=2)
    assert qr.keys() == st.keys()
    for m in qr:
        assert st[m].a.shape == qr[m].a.shape and st[m].b.shape == qr[m].b.shape and st[m].a.dtype == torch.float32
        assert torch.allclose(dense_update(st, m), dense_update(qr, m), atol=1e-3)
        norms = st[m].b.norm(dim=0)
        assert torch.all(norms[:-1] >= norms[1:] - 1e-5)  # components ordered by singular value


def test_sites_can_be_streamed_from_a_generator_factory():
    calls = []

    def source():
        calls.append(1)
        return ((site(8, s, decay=0.3), 1.0) for s in range(6))

    got = streaming_lora_aggregate(source, max_rank=8, power_iters=1)
    assert len(calls) == 4  # 2 + 2 * power_iters passes, never all sites held at once
    want = streaming_lora_aggregate(list(source()), max_rank=8, power_iters=1)
    for m in MODULES:
        assert torch.allclose(dense_update(got, m), dense_update(want, m), atol=1e-5)


def test_exact_aggregate_switches_to_streaming_above_the_stack_limit(monkeypatch):
    updates = [(site(8, s, decay=0.3), 1.0) for s in range(6)]
    monkeypatch.setattr(aggregation, "STACK_LIMIT", 16)
    got = exact_lora_aggregate(updates, max_rank=8)
    for m in MODULES:
        target = best(dense_sum(updates, m), 8)
        assert ((dense_update(got, m).double() - target).norm() / target.norm()) < 1e-3


def test_naive_stream_equals_naive_with_mixed_ranks():
    updates = [(site(4, 1), 1.0), (site(8, 2), 3.0), (site(4, 3), 2.0)]
    a, b = naive_lora_aggregate(updates), naive_lora_aggregate_stream(updates)
    for m in MODULES:
        assert torch.allclose(dense_update(a, m), dense_update(b, m), atol=1e-5)


def test_no_updates_rejected():
    with pytest.raises(ValueError):
        streaming_lora_aggregate([], 4)


# -- the block Krylov path: what exact_lora_aggregate runs above STACK_LIMIT ----------------
from fedmoe.server.federation import streaming_aggregation  # noqa: E402
from fedmoe.server.federation.streaming_aggregation import block_krylov_lora_aggregate  # noqa: E402


def flat_site(rank: int, out: int, inn: int, seed: int) -> LoraDelta:
    """Independent Gaussian factors: the sum of many has a flat spectrum (the hard case)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rank, inn, generator=g) / inn**0.5, torch.randn(out, rank, generator=g) / rank**0.5
    return LoraDelta.from_factors({"m": (a, b)}, rank, 2.0 * rank, "fp")


def test_block_krylov_is_exact_when_two_blocks_cover_the_whole_rank():
    # module 128 x 96 (wider than two blocks of 8 + 4), Σr = 4 + 8 + 8 = 20 <= 24 columns of Krylov space
    updates = [(flat_site(4, 128, 96, 1), 1.0), (flat_site(8, 128, 96, 2), 3.0), (flat_site(8, 128, 96, 3), 2.0)]
    got = block_krylov_lora_aggregate(updates, max_rank=20 - 12, oversample=4)
    want = dense_sum(updates, "m")
    target = best(want, 8)
    assert torch.allclose(dense_update(got, "m").double(), target, atol=1e-4 * want.abs().max())
    full = block_krylov_lora_aggregate(updates, max_rank=20, oversample=0)  # 2 x 20 columns >= Σr: the whole sum
    assert torch.allclose(dense_update(full, "m").double(), want, atol=1e-4 * want.abs().max())


@pytest.mark.parametrize("seed", [0, 1])
def test_block_krylov_within_3_percent_of_optimal_on_a_flat_spectrum(seed):
    # 18 sites of rank 16: Σr = 288 > STACK_LIMIT, far more than the 2 x 20 columns sketched
    updates = [(flat_site(16, 384, 256, 100 * seed + k), float(1 + k % 3)) for k in range(18)]
    want = dense_sum(updates, "m")
    opt = (want - best(want, 16)).norm()
    got = block_krylov_lora_aggregate(updates, max_rank=16, seed=seed)
    ratio = float((want - dense_update(got, "m").double()).norm() / opt)
    assert 1.0 <= ratio <= 1.03, ratio
    # the range finder without power iteration, same number of sites, is measurably worse
    plain = streaming_lora_aggregate(updates, max_rank=16, power_iters=0, seed=seed)
    assert float((want - dense_update(plain, "m").double()).norm() / opt) > ratio + 0.02


def test_block_krylov_matches_the_dense_truncated_svd_with_a_spectral_gap():
    updates = [(site(8, s, decay=0.3), float(1 + s % 3)) for s in range(12)]  # Σr = 96 > 2 x 12 columns
    got = block_krylov_lora_aggregate(updates, max_rank=8, oversample=4, dtype=torch.float64)
    for m in MODULES:  # 48 x 40: two blocks of 12; 48 x 24: sketched whole. A larger module below
        target = best(dense_sum(updates, m), 8)
        assert ((dense_update(got, m).double() - target).norm() / target.norm()) < 1e-6
    g = torch.Generator().manual_seed(7)
    shared_a, shared_b = torch.randn(8, 200, generator=g), torch.randn(160, 8, generator=g)
    scale = torch.tensor([0.7**c for c in range(8)])[:, None]
    gapped = [(LoraDelta.from_factors({"m": (scale * shared_a + 0.02 * torch.randn(8, 200, generator=g),
                                             shared_b + 0.02 * torch.randn(160, 8, generator=g))}, 8, 16.0, "fp"), 1.0 + k % 3)
              for k in range(40)]  # Σr = 320, module 160 x 200: two blocks of 12 out of 160
    got = block_krylov_lora_aggregate(gapped, max_rank=8, oversample=4, dtype=torch.float64)
    want = dense_sum(gapped, "m")
    target = best(want, 8)
    assert ((dense_update(got, "m").double() - target).norm() / target.norm()) < 1e-3
    assert (want - dense_update(got, "m").double()).norm() <= (want - target).norm() * (1 + 1e-4)


def test_block_krylov_makes_four_passes_and_streams_from_a_factory():
    calls = []

    def source():
        calls.append(1)
        return ((flat_site(8, 96, 80, s), 1.0 + s % 2) for s in range(8))

    got = block_krylov_lora_aggregate(source, max_rank=8, oversample=2)
    assert len(calls) == 4
    want = block_krylov_lora_aggregate(list(source()), max_rank=8, oversample=2)
    assert torch.allclose(dense_update(got, "m"), dense_update(want, "m"), atol=1e-5)
    assert got["m"].a.shape == (8, 80) and got["m"].b.shape == (96, 8) and got["m"].a.dtype == torch.float32


def test_coordinator_dispatches_to_block_krylov_above_the_stack_limit(monkeypatch):
    seen = []
    real = streaming_aggregation.block_krylov_lora_aggregate

    def spy(updates, max_rank, **kw):
        seen.append(sum(d.rank for d, _ in updates))
        return real(updates, max_rank, **kw)

    monkeypatch.setattr(streaming_aggregation, "block_krylov_lora_aggregate", spy)
    assert aggregation.STACK_LIMIT == 256
    at_limit = [(flat_site(16, 48, 40, k), 1.0) for k in range(16)]  # Σr = 256: stacked QR
    exact_lora_aggregate(at_limit, max_rank=16)
    assert seen == []
    above = at_limit + [(flat_site(16, 48, 40, 99), 1.0)]  # Σr = 272
    got = exact_lora_aggregate(above, max_rank=16)
    assert seen == [272]
    target = best(dense_sum(above, "m"), 16)
    assert ((dense_update(got, "m").double() - target).norm() / target.norm()) < 1e-4  # 48 x 40: sketched whole


def test_block_krylov_rejects_bad_input():
    with pytest.raises(ValueError):
        block_krylov_lora_aggregate([], 4)
    with pytest.raises(ValueError):
        block_krylov_lora_aggregate([(flat_site(4, 16, 16, 0), 1.0)], 0)
