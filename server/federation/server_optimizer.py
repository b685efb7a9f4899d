"""Server-side Adam on pseudo-gradients (FedAdam; Reddi et al., "Adaptive Federated
Optimization", 2021).

Each round the aggregate of the sites' results is a target; the pseudo-gradient is
target - state, and Adam moves the state along it. For an expert the state is each
module's ΔW, kept dense on the coordinator (it hosts the full-precision model anyway):
first and second moments cost 2 x out x in floats per adapted module. The new ΔW is
re-factorized by truncated SVD to the expert's largest site rank, like every exact
aggregate. The learned gate uses the same optimizer on its router weights.
"""

from __future__ import annotations

import torch

from fedmoe.server.federation.low_rank import LowRank


class FedAdam:
    """Adam over named tensors. `bias_correction=False` is the FedOpt paper's (and
    Flower's FedAdam) form: x += lr m / (sqrt(v) + tau); with it, torch.optim.Adam's."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-3, bias_correction: bool = False):
        self.lr, self.beta1, self.beta2, self.eps, self.bias_correction = lr, beta1, beta2, eps, bias_correction
        self.m1: dict[str, torch.Tensor] = {}
        self.m2: dict[str, torch.Tensor] = {}
        self.t = 0

    def step(self, state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state moved one step along (target - state)."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        out = {}
        for k, x in state.items():
            g = target[k] - x
            self.m1[k] = b1 * self.m1.get(k, torch.zeros_like(g)) + (1 - b1) * g
            self.m2[k] = b2 * self.m2.get(k, torch.zeros_like(g)) + (1 - b2) * g * g
            m1, m2 = self.m1[k], self.m2[k]
            if self.bias_correction:
                m1, m2 = m1 / (1 - b1**self.t), m2 / (1 - b2**self.t)
            out[k] = x + self.lr * (m1 / (m2.sqrt() + self.eps))
        return out


def truncated_lowrank(w: torch.Tensor, rank: int) -> LowRank:
    """The best rank-`rank` approximation of a dense ΔW, in the SVD form of the aggregates."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return LowRank((u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float())


class ExpertFedAdam:
    """FedAdam per expert: `step(expert, previous, aggregate, rank)` -> the new expert."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-3):
        self.settings = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, bias_correction=True)
        self.optimizers: dict[str, FedAdam] = {}

    def step(self, expert: str, previous: dict[str, LowRank] | None, aggregate: dict[str, LowRank], rank: int) -> dict[str, LowRank]:
        target = {m: lr.b.double() @ lr.a.double() for m, lr in aggregate.items()}
        state = {m: (previous[m].b.double() @ previous[m].a.double()) if previous else torch.zeros_like(w)
                 for m, w in target.items()}
        opt = self.optimizers.setdefault(expert, FedAdam(**self.settings))
        return {m: truncated_lowrank(w, rank) for m, w in opt.step(state, target).items()}
