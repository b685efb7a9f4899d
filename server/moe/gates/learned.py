"""`LearnedGate`: a linear router trained by federated rounds, experts frozen.

Each round the coordinator sends the router's weights to the sites; each runs
`fedmoe.client.router.local_router_update` on its own records and returns new weights
and its example count; the coordinator takes their count-weighted mean and moves the
router along (mean - current) with Adam (FedAdam, Reddi et al. 2021): every site holds
one domain, and a plain FedAvg of single-domain updates barely moves the router off
uniform on the default suite, while server-side Adam routes >95% within 20 rounds.
Only router weights travel. `federated_router_rounds` drives this with any callables that
play the sites, in-process in simulation.

Router DP (`RouterPrivacy`, on by default in `fedmoe simulate`): the same mechanism as
`--privacy dp` for the experts. Each site clips its update u_k = new_k - state to norm C
(fedmoe.client.router) and sends no loss; the coordinator checks every norm, averages the
u_k with equal weights and adds N(0, (z C / n)^2) to every coordinate of the mean (noise
from the OS CSPRNG, fedmoe.shared.dp_noise, never the run seed), then takes the FedAdam
step towards state + noisy mean (post-processing: no privacy cost). Sensitivity of the
mean to one site is C / n, so each round is one site-level Gaussian step at sample rate 1
(every site takes part every round), accounted by the experts' Opacus RDP accountant
(fedmoe.server.federation.privacy.PrivacyAccountant); ε(δ) after the last round is the
gate's guarantee for the router's training (the router's ε; the experts' runs and the
prototype gate are separate releases with their own ε).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fedmoe.shared.features import LinearRouter
from fedmoe.server.federation.server_optimizer import FedAdam
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.features import FeatureConfig

SiteStep = Callable[[dict], tuple[dict, int, dict]]

# Router DP defaults, measured on the smoke preset (README, "Privacy"): with the centered
# router a site's 10 local steps move it by ~0.11-0.12, so C = 0.1 binds for every site and
# the noise z C / n sits on a mean of full-norm updates. Smoke (4 sites, 8 rounds): routing
# 0.575-0.875 over 3 draws of the noise (0.975 without it), router ε 16.5 at δ 1e-5.
DEFAULT_ROUTER_CLIP = 0.1
DEFAULT_ROUTER_NOISE_MULTIPLIER = 1.0
DEFAULT_ROUTER_DELTA = 1e-5


@dataclass(frozen=True)
class RouterPrivacy:
    """Central DP for the router rounds: clip C (sites), noise multiplier z (coordinator)."""

    noise_multiplier: float = DEFAULT_ROUTER_NOISE_MULTIPLIER
    clip: float = DEFAULT_ROUTER_CLIP
    delta: float = DEFAULT_ROUTER_DELTA

    def __post_init__(self):
        if not self.clip > 0:
            raise FedmoeError(f"router clip must be > 0, got {self.clip}")
        if not self.noise_multiplier > 0:
            raise FedmoeError(f"router noise multiplier must be > 0 (no noise: no RouterPrivacy), got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise FedmoeError(f"router DP delta must be in (0, 1), got {self.delta}")


def private_mean(updates: list[dict[str, torch.Tensor]], clip: float, noise_multiplier: float) -> tuple[dict[str, torch.Tensor], float]:
    """(equal-weight mean of the clipped updates + N(0, (z C / n)^2) per coordinate, its std).
    The noise is drawn from the OS CSPRNG (fedmoe.shared.dp_noise), never a seeded generator."""
    from fedmoe.shared.dp_noise import gaussian_noise

    n = len(updates)
    std = noise_multiplier * clip / n
    keys = updates[0].keys()  # the trained weights (LinearRouter.TRAINED) only
    return {k: sum(u[k].double() for u in updates) / n + gaussian_noise(updates[0][k].shape, std, torch.float64)
            for k in keys}, std


def fedavg(updates: list[tuple[dict, int]]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in updates)
    if total <= 0:
        raise FedmoeError("no router updates to average")
    keys = updates[0][0].keys()
    return {k: sum(s[k].float() * (n / total) for s, n in updates) for k in keys}


def federated_router_rounds(dim: int, experts: int, sites: list[SiteStep], rounds: int = 20,
                            server_lr: float = 0.01, progress=None, privacy: RouterPrivacy | None = None,
                            server_eps: float = 1e-8, center: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The router after `rounds` rounds, and per-round history. With `privacy`, the sites
    are expected to clip to `privacy.clip` (a reply over the bound is left out of that
    round) and the mean is noised; history then holds the noise std and ε, not losses.
    `center`: the router's feature center (public to the federation; sent with the weights,
    never changed by the sites' replies)."""
    from fedmoe.server.federation.privacy import PrivacyAccountant, update_norm

    state = {k: v.detach().clone() for k, v in LinearRouter(dim, experts, center).state_dict().items()}
    trained = LinearRouter.TRAINED
    server = FedAdam(server_lr, 0.9, 0.99, server_eps, bias_correction=True)
    accountant = PrivacyAccountant(privacy.noise_multiplier, privacy.delta) if privacy else None
    history = []
    for rnd in range(1, rounds + 1):
        replies = [site(state) for site in sites]
        for new, _, _ in replies:
            if set(new) != set(state) or any(new[k].shape != state[k].shape or not torch.isfinite(new[k]).all() for k in state):
                raise FedmoeError(f"round {rnd}: a site returned malformed router weights")
        weights = {k: state[k] for k in trained}
        if privacy is None:
            mean = fedavg([({k: new[k] for k in trained}, n) for new, n, _ in replies])
            weights = server.step(weights, mean)  # along the pseudo-gradient (mean - state)
            metrics = {k: sum(m[k] * n for _, n, m in replies) / sum(n for _, n, _ in replies) for k in replies[0][2]}
        else:
            updates = [{k: new[k].double() - state[k].double() for k in trained} for new, _, _ in replies]
            kept = [u for u in updates if update_norm(u) <= privacy.clip * (1 + 1e-4)]
            if not kept:
                raise FedmoeError(f"round {rnd}: every router update exceeds the DP clip {privacy.clip:g}")
            mean, std = private_mean(kept, privacy.clip, privacy.noise_multiplier)
            weights = server.step(weights, {k: (state[k].double() + mean[k]).float() for k in trained})
            accountant.step(1.0)  # every site, every round
            metrics = {"noise_std": std, "sites_ok": len(kept), "sites_over_clip": len(updates) - len(kept),
                       "epsilon": accountant.epsilon()}
        state = state | weights  # the center stays what the coordinator set
        history.append({"round": rnd, **metrics})
        if progress:
            progress(rnd, metrics)
    return state, history


def router_privacy_info(privacy: RouterPrivacy | None, rounds: int, sites: int,
                        center: tuple[float, float] | None = None) -> dict:
    """What the report says about the router's privacy: ε, δ, z, C, or "not private".
    `center`: (ε, δ) of the release the router's feature center was computed from (the
    sites' DP prototypes); the gate's ε composes both (basic composition: ε and δ add)."""
    if privacy is None:
        return {"private": False, "privacy": "not private: router updates unclipped and un-noised"}
    from fedmoe.server.federation.privacy import PrivacyAccountant

    acc = PrivacyAccountant(privacy.noise_multiplier, privacy.delta)
    acc.step(1.0, rounds)
    eps = acc.epsilon()
    info = {"private": True, "privacy": "site-level central DP (clipped updates, Gaussian noise on the mean)",
            "accountant": "opacus RDP (site-level), 1 Gaussian step per round at sample rate 1",
            "epsilon": eps, "delta": privacy.delta, "epsilon_router": eps,
            "noise_multiplier": privacy.noise_multiplier, "clip_norm": privacy.clip, "rounds": rounds, "sites": sites}
    if center is not None:
        info |= {"epsilon": eps + center[0], "delta": privacy.delta + center[1], "epsilon_center": center[0],
                 "privacy": info["privacy"] + "; feature center from the sites' DP prototypes (composed)"}
    return info


class LearnedGate:
    name = "learned"
    needs_data = True
    site_requirements = "federated router rounds: each round every site trains the router on its records, experts frozen"

    def __init__(self, served, router_state: dict[str, torch.Tensor], temperature: float = 1.0):
        self.served, self.experts = served, list(served.experts)
        self.router = LinearRouter(served.featurizer.cfg.dim, len(self.experts))
        try:
            # gates saved before the router had a center route uncentered (center 0)
            self.router.load_state_dict({"center": self.router.center} | {k: v.float() for k, v in router_state.items()})
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
