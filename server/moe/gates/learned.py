"""`LearnedGate`: a linear router trained by federated rounds, experts frozen.

Each round the coordinator sends the router's weights to the sites; each runs
`fedmoe.client.router.local_router_update` on its own records and returns new weights
and its example count; the coordinator takes their count-weighted mean and moves the
router along (mean - current) with Adam (FedAdam, Reddi et al. 2021): every site holds
one domain, and a plain FedAvg of single-domain updates barely moves the router off
uniform on the default suite, while server-side Adam routes >95% within 20 rounds.
Only router weights travel. `federated_router_rounds` drives this with any callables that
play the sites, in-process in simulation.
"""

from __future__ import annotations

from typing import Callable

import torch

from fedmoe.shared.features import LinearRouter
from fedmoe.server.federation.server_optimizer import FedAdam
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.features import FeatureConfig

SiteStep = Callable[[dict], tuple[dict, int, dict]]


def fedavg(updates: list[tuple[dict, int]]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in updates)
    if total <= 0:
        raise FedmoeError("no router updates to average")
    keys = updates[0][0].keys()
    return {k: sum(s[k].float() * (n / total) for s, n in updates) for k in keys}


def federated_router_rounds(dim: int, experts: int, sites: list[SiteStep], rounds: int = 20,
                            server_lr: float = 0.01, progress=None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = {k: v.detach().clone() for k, v in LinearRouter(dim, experts).state_dict().items()}
    server = FedAdam(server_lr, 0.9, 0.99, 1e-8, bias_correction=True)
    history = []
    for rnd in range(1, rounds + 1):
        replies = [site(state) for site in sites]
        for new, _, _ in replies:
            if set(new) != set(state) or any(new[k].shape != state[k].shape or not torch.isfinite(new[k]).all() for k in state):
                raise FedmoeError(f"round {rnd}: a site returned malformed router weights")
        state = server.step(state, fedavg([(new, n) for new, n, _ in replies]))  # along the pseudo-gradient (mean - state)
        metrics = {k: sum(m[k] * n for _, n, m in replies) / sum(n for _, n, _ in replies) for k in replies[0][2]}
        history.append({"round": rnd, **metrics})
        if progress:
            progress(rnd, metrics)
    return state, history


class LearnedGate:
    name = "learned"
    needs_data = True
    site_requirements = "federated router rounds: each round every site trains the router on its records, experts frozen"

    def __init__(self, served, router_state: dict[str, torch.Tensor], temperature: float = 1.0):
        self.served, self.experts = served, list(served.experts)
        self.router = LinearRouter(served.featurizer.cfg.dim, len(self.experts))
        try:
            self.router.load_state_dict({k: v.float() for k, v in router_state.items()})
        except RuntimeError as exc:
            raise FedmoeError(f"router weights do not fit {len(self.experts)} experts: {str(exc).splitlines()[0]}") from None
        self.router.eval()
        self.temperature = float(temperature)

    @torch.no_grad()
    def route(self, prompts: list[str]) -> torch.Tensor:
        return torch.softmax(self.router(self.served.featurizer(prompts)) / self.temperature, dim=-1)

    def state(self):
        return dict(self.router.state_dict()), {"temperature": self.temperature,
                                                "features": self.served.featurizer.cfg.as_dict()}

    @classmethod
    def from_state(cls, served, tensors, meta):
        if FeatureConfig.from_dict(meta.get("features", {})) != served.featurizer.cfg:
            raise FedmoeError("learned gate was trained on other routing features than the served model uses")
        return cls(served, tensors, meta.get("temperature", 1.0))
