"""Privacy on the coordinator: frozen-A (FFA-LoRA) aggregation, central Gaussian noise,
and the RDP accountant.

Modes (`StrategyConfig.privacy`):
- `none`: updates as trained, exact aggregation.
- `dp`: sites train B only against a shared frozen A and clip their update
  u_k = s (B_k - B_0) to norm C (fedmoe.client.privacy); the coordinator averages the
  clipped updates with equal weights and adds N(0, (z C / n)²) to every coordinate of
  the mean — central DP (trusted aggregator) with client-side fixed clipping, the
  DP-FedAvg mechanism of Flower's `DifferentialPrivacyClientSideFixedClipping`, written
  out here because our strategy is not a `flwr.serverapp.strategy.Strategy`. Sensitivity
  of the mean to one site (site-level DP) is C / n. The accountant is Opacus's RDP
  accountant: each expert a site trains in a round is one Gaussian step at sample rate q
  (the sampled fraction); ε(δ) after every round goes into the run store metrics.
- `ffa`: frozen A, no noise: the plaintext FFA-LoRA aggregate (weights by examples).
- `secagg`: frozen A too, so the sum of site B-updates is the exact aggregate; each
  domain's sum goes through Flower's SecAgg+ protocol, so the coordinator only ever holds
  the per-domain weighted mean (fedmoe.server.federation.secagg, fedmoe.client.secagg).

With a frozen A the expert is kept as (s B, A_0): ΔW = s B A_0 with A_0 the seeded
initial A at the expert's largest rank; a site of rank r gets the first r components
(HetLoRA slicing), and its update is zero-padded to the expert's rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedmoe.server.federation.low_rank import LowRank
from fedmoe.shared.delta import LoraDelta, b_update  # noqa: F401  (b_update: the sites compute it too)
from fedmoe.shared.dp_noise import gaussian_noise
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.privacy_modes import MODES  # noqa: F401  (named once, for the sites' policies too)

# The site's update norm bound C when --clip is not given. dp: C sets the noise (z C / n), so
# it is small. secagg: C only has to contain every coordinate for SecAgg+'s quantization
# (error ≤ n 2C / 2^28), so it sits well above the update norms seen (||s (B_k - B_0)|| ≈ 10
# in the smoke preset) and rarely binds: a binding clip changes training, it hides nothing more.
DEFAULT_CLIP = {"dp": 1.0, "secagg": 100.0}


def default_clip(mode: str, clip: float | None) -> float:
    return clip if clip is not None else DEFAULT_CLIP.get(mode, 1.0)


@dataclass
class PrivacyConfig:
    mode: str = "none"
    noise_multiplier: float = 1.0
    clip: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise FedmoeError(f"unknown privacy mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.mode in ("dp", "secagg") and not self.clip > 0:
            raise FedmoeError(f"--clip must be > 0, got {self.clip}")
        if self.mode == "dp":
            if not self.noise_multiplier >= 0:
                raise FedmoeError(f"--noise-multiplier must be >= 0, got {self.noise_multiplier}")
            if not 0 < self.delta < 1:
                raise FedmoeError(f"DP delta must be in (0, 1), got {self.delta}")

    @property
    def frozen_a(self) -> bool:
        return self.mode in ("ffa", "dp", "secagg")


class PrivacyAccountant:
    """Opacus RDP accountant for the site-level Gaussian mechanism."""

    def __init__(self, noise_multiplier: float, delta: float):
        from opacus.accountants import RDPAccountant

        self.z, self.delta = noise_multiplier, delta
        self.acc = RDPAccountant()

    def step(self, sample_rate: float, steps: int = 1) -> None:
        for _ in range(steps):
            self.acc.step(noise_multiplier=self.z, sample_rate=sample_rate)

    def epsilon(self) -> float:
        if not self.acc.history:
            return 0.0
        if self.z == 0:
            return math.inf
        return float(self.acc.get_epsilon(self.delta))

    def epsilon_after(self, sample_rate: float, steps: int) -> float:
        """ε if `steps` more Gaussian steps at `sample_rate` were taken (nothing recorded)."""
        from opacus.accountants import RDPAccountant

        if self.z == 0:
            return math.inf
        trial = RDPAccountant()
        trial.history = list(self.acc.history)
        for _ in range(steps):
            trial.step(noise_multiplier=self.z, sample_rate=sample_rate)
        return float(trial.get_epsilon(self.delta))


def update_norm(u: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t ** 2).sum()) for t in u.values()))


def frozen_a_aggregate(current: dict[str, LowRank] | None, a0: LoraDelta, updates: list[tuple[dict[str, torch.Tensor], float]],
                       scale: float, noise_std: float = 0.0) -> dict[str, LowRank]:
    """Expert after one round: s B_new = s B_cur + Σ p_k u_k (+ N(0, noise_std²)), A fixed at A_0.
    Returned in the strategy's LowRank form (ΔW = b @ a, sqrt(s) folded into each)."""
    total = sum(w for _, w in updates)
    if not updates or total <= 0:
        raise ValueError("no updates to aggregate")
    root = math.sqrt(scale)
    out = {}
    for m in a0.modules():
        a, _ = a0.factors(m)
        sb = (current[m].b.double() * root) if current is not None else torch.zeros(updates[0][0][m].shape, dtype=torch.float64)
        mean = sum(u[m] * (w / total) for u, w in updates)
        if noise_std > 0:
            mean = mean + gaussian_noise(mean.shape, noise_std, torch.float64)  # never from the run seed
        out[m] = LowRank(((sb + mean) / root).float(), (a.double() * root).float())
    return out


def record_losses(model, tokenizer, records, batch_size: int = 64, max_length: int = 128) -> list[float]:
    """Per-record completion loss (the membership-inference attack's score)."""
    from fedmoe.shared.training import collate, encode_record, model_device, pads_left, score_batch

    model.eval()
    out: list[float] = []
    for i in range(0, len(records), batch_size):
        batch = collate([encode_record(tokenizer, r, max_length) for r in records[i:i + batch_size]],
                        tokenizer.pad_token_id, model_device(model), left=pads_left(model))
        out += score_batch(model, batch)[1].tolist()
    return out


def loss_threshold_auc(member_losses: list[float], nonmember_losses: list[float]) -> float:
    """AUC of the attack "member iff loss < t" over all t (Mann-Whitney; ties count half)."""
    if not member_losses or not nonmember_losses:
        raise ValueError("need members and non-members")
    wins = sum((m < n) + 0.5 * (m == n) for m in member_losses for n in nonmember_losses)
    return wins / (len(member_losses) * len(nonmember_losses))
