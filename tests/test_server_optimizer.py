"""FedAdam on the coordinator: the optimizer's arithmetic, and an expert's round with
`server_opt="fedadam"` moving its ΔW along the pseudo-gradient of the exact aggregate."""

import pytest
import torch

from fedmoe.server.federation.aggregation import dense_update, exact_lora_aggregate
from fedmoe.server.federation.server_optimizer import FedAdam, truncated_lowrank
from fedmoe.server.federation.strategy import StrategyConfig
from fedmoe.shared.errors import FedmoeError
from tests.test_strategy import make_strategy, reply, trained

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_bias_corrected_fedadam_is_torch_adam_on_the_negated_pseudo_gradient():
    gen = torch.Generator().manual_seed(0)
    x = {"w": torch.randn(5, 3, generator=gen, dtype=torch.float64)}
    ref = torch.nn.Parameter(x["w"].clone())
    torch_adam = torch.optim.Adam([ref], lr=0.05, betas=(0.9, 0.99), eps=1e-8)
    ours = FedAdam(0.05, 0.9, 0.99, 1e-8, bias_correction=True)
    for _ in range(4):
        target = {"w": torch.randn(5, 3, generator=gen, dtype=torch.float64)}
        ref.grad = -(target["w"] - ref.detach())
        torch_adam.step()
        x = ours.step(x, target)
        assert torch.allclose(x["w"], ref.detach(), atol=1e-12)


def test_fedopt_form_first_step():
    """No bias correction (Reddi et al.; Flower's FedAdam): x + lr m / (sqrt(v) + tau)."""
    g = torch.tensor([1e-4, -2e-2, 0.0], dtype=torch.float64)
    out = FedAdam(1e-3, 0.9, 0.99, 1e-3).step({"w": torch.zeros(3, dtype=torch.float64)}, {"w": g})["w"]
    expected = 1e-3 * (0.1 * g) / ((0.01 * g * g).sqrt() + 1e-3)
    assert torch.allclose(out, expected, rtol=1e-12)


def test_truncated_lowrank_is_the_best_rank_r_approximation():
    w = torch.randn(12, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lr = truncated_lowrank(w, 3)
    u, s, vh = torch.linalg.svd(w)
    assert torch.allclose((lr.b @ lr.a).double(), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)


def test_fedadam_round_moves_each_expert_along_its_exact_aggregate():
    plain, adam = make_strategy(), make_strategy(server_opt="fedadam", server_lr=3e-3, server_tau=1e-3)
    replies = {}
    for strategy in (plain, adam):
        sent = strategy.configure_train(1)
        got = [reply(msg, replies.setdefault(node.node_id, trained(msg, node.node_id)), 10 * node.node_id)
               for _, node, msg in sent]
        strategy.aggregate_train(1, sent, got)
    for expert in ("law", "medicine"):
        rank = adam.max_rank(expert)
        for module in plain.experts[expert]:
            aggregate = dense_update(plain.experts[expert], module).double()
            # round 1, bias-corrected: from ΔW = 0 a step of lr g / (|g| + tau) toward the aggregate g
            want = truncated_lowrank(3e-3 * aggregate / (aggregate.abs() + 1e-3), rank)
            got = dense_update(adam.experts[expert], module).double()
            assert torch.allclose(got, (want.b @ want.a).double(), atol=1e-6)
            assert not torch.allclose(got, aggregate, atol=1e-4)  # the server step is not the plain aggregate


def test_fedadam_refuses_frozen_a_privacy_and_unknown_names():
    with pytest.raises(FedmoeError, match="frozen shared A"):
        make_strategy(server_opt="fedadam", privacy="ffa")
    with pytest.raises(FedmoeError, match="unknown server optimizer 'sgd'"):
        make_strategy(server_opt="sgd")
