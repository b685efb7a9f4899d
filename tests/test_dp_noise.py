"""DP noise is not derived from the run seed (issue 16): the seed is public (run.json, the
run store), so noise recomputed from it must not give back the noiseless sums. The
attack is tried for both mechanisms: the coordinator's Gaussian noise on the FFA-LoRA
mean (`--privacy dp`) and a site's noised prototype for the prototype gate."""

import pytest
import torch
from test_privacy import site_reply, strategy

from fedmoe.client.prototype import site_prototype
from fedmoe.server.federation.aggregation import dense_update
from fedmoe.shared.dp_noise import gaussian_noise, private_generator

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_private_draws_are_fresh_and_gaussian():
    a, b = gaussian_noise((20000,), 2.0), gaussian_noise((20000,), 2.0)
    assert not torch.equal(a, b)
    assert abs(float(a.mean())) < 0.1 and float(a.std()) == pytest.approx(2.0, rel=0.05)  # statistical, not exact
    torch.manual_seed(0)
    x = torch.randn(8, generator=private_generator())
    torch.manual_seed(0)
    assert not torch.equal(x, torch.randn(8, generator=private_generator()))  # the global seed does not reach it


def dp_round(seed: int):
    """One `--privacy dp` round of three law sites, all seeded by `seed`: (noisy ΔW, noiseless ΔW) per module."""
    noisy = strategy(privacy="dp", noise_multiplier=1.0, clip=0.5, seed=seed)
    clean = strategy(privacy="ffa", seed=seed)
    out = {}
    for s in (noisy, clean):
        sent = s.configure_train(1)
        replies = [site_reply(msg, node, 0.01 * node.node_id, clip=0.5)[2] for _, node, msg in sent]
        s.aggregate_train(1, sent, replies)
    for m in noisy.experts["law"]:
        out[m] = (dense_update(noisy.experts["law"], m).double(), dense_update(clean.experts["law"], m).double())
    return out, noisy


def test_coordinator_noise_cannot_be_recomputed_from_the_run_seed():
    first, s = dp_round(seed=7)
    second, _ = dp_round(seed=7)
    for m in first:
        (n1, clean1), (n2, clean2) = first[m], second[m]
        assert torch.allclose(clean1, clean2)  # everything seeded repeats ...
        assert not torch.allclose(n1, n2)  # ... the noise does not
        noise = n1 - clean1
        # The attacker's guesses: generators seeded from what the run publishes.
        for guess in (7, 7 * 1000, 7 * 1000 + 1, 0):
            g = torch.Generator().manual_seed(guess)
            a0 = s.init_adapter(8).factors(m)[0].double()
            guessed = torch.randn(noise.shape[0], a0.shape[0], generator=g, dtype=torch.float64) * 0.5 @ a0
            assert not torch.allclose(n1 - guessed, clean1, atol=1e-3)
        assert float(noise.norm()) > 1e-3  # noise was added at all


def test_prototype_noise_cannot_be_recomputed_from_the_run_seed():
    features = torch.nn.functional.normalize(torch.arange(1.0, 5 * 256 + 1).reshape(5, 256), dim=1) * 0.2

    def featurizer(prompts):  # a site's routing features (fixed, so only the noise varies)
        return features[: len(prompts)]

    from fedmoe.shared.data import Record

    records = [Record(f"q{i}", "a") for i in range(5)]
    clean = features.sum(0) / 5
    a, b = site_prototype(featurizer, records, 0.25, 0.3), site_prototype(featurizer, records, 0.25, 0.3)
    assert not torch.allclose(a.prototype, b.prototype)
    noise = a.prototype * 5 - features.sum(0)
    assert float(noise.std()) == pytest.approx(0.3 * 0.25, rel=0.25)  # N(0, (z C)^2): statistical check
    for seed in (0, 1, 1000, 0 * 1000 + 0, 0 * 1000 + 1):  # the seeds moe_report used to pass
        guessed = torch.randn(256, generator=torch.Generator().manual_seed(seed)) * 0.3 * 0.25
        assert not torch.allclose((a.prototype * 5 - guessed) / 5, clean, atol=1e-4)
