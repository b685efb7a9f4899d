"""Robust aggregation: what a faulty or malicious site can do to an expert is bounded.

Validation (`LoraDelta.validate`) already throws out malformed replies (NaN, wrong
shapes, wrong keys). What it cannot catch is a well-formed but *boosted* update. Here:

- **Outlier rejection by update norm.** A site's update is the change of the dense
  weight it reports, ||s_k B_k A_k - s_0 B_0 A_0||_F, against the adapter it was sent
  (computed from the stacked factors, never a dense out x in matrix). The reference is
  the median and MAD of the update norms of *every* accepted reply of the round, pooled
  over experts: a domain has as few as two sites, where a per-domain median is
  meaningless, while all sites train the same model with the same steps and learning
  rate, so honest norms are of one magnitude. An update above both
  median + z * 1.4826 * MAD and `reject_factor` x median is rejected with its numbers.
- **Norm bounding.** Survivors above `clip_factor` x median are scaled back to it:
  W_0 + c (W_k - W_0), written exactly as a stacked adapter of rank r_k + r_0 (scaling
  folded into B), so exact aggregation stays exact.

Why not coordinate-wise statistics on the dense ΔW: an out x in tensor per site per
module is the thing exact aggregation exists to avoid (4096² x sites at 7B scale).
Coordinate-wise **trimmed mean** and **median** are offered on the factors instead
(the FedIT path): sites start each round from the same adapter and take a few steps,
so their factors stay aligned coordinate by coordinate, which is also why FedIT works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedmoe.server.federation.low_rank import LowRank
from fedmoe.shared.delta import LoraDelta
from fedmoe.shared.errors import FedmoeError

METHODS = ("none", "norm", "trimmed-mean", "median")


@dataclass
class RobustConfig:
    method: str = "none"  # none | norm | trimmed-mean | median (the last two also screen by norm)
    outlier_z: float = 3.5
    reject_factor: float = 4.0
    clip_factor: float = 2.0
    trim: float = 0.2  # fraction trimmed at each end, per coordinate

    def __post_init__(self):
        if self.method not in METHODS:
            raise FedmoeError(f"unknown robust aggregation {self.method!r}: choose one of {', '.join(METHODS)}")


def update_norm(trained: LoraDelta, sent: LoraDelta) -> float:
    """||s_t B_t A_t - s_0 B_0 A_0||_F summed over modules, from stacked factors:
    ||B A||² = trace((BᵀB)(A Aᵀ)) with B = [s_t B_t | -s_0 B_0], A = [A_t; A_0]."""
    total = 0.0
    for m in trained.modules():
        at, bt = (t.double() for t in trained.factors(m))
        a0, b0 = (t.double() for t in sent.factors(m))
        b = torch.cat([bt * trained.scaling, -b0 * sent.scaling], dim=1)
        a = torch.cat([at, a0], dim=0)
        total += float(torch.trace((b.T @ b) @ (a @ a.T)))
    return math.sqrt(max(total, 0.0))


def shrink_update(trained: LoraDelta, sent: LoraDelta, c: float) -> LoraDelta:
    """W_0 + c (W_t - W_0) as an exact adapter of rank r_t + r_0 (alpha = rank, scaling 1)."""
    factors = {}
    for m in trained.modules():
        at, bt = trained.factors(m)
        a0, b0 = sent.factors(m)
        b = torch.cat([bt.float() * (c * trained.scaling), b0.float() * ((1 - c) * sent.scaling)], dim=1)
        factors[m] = (torch.cat([at.float(), a0.float()], dim=0), b)
    rank = trained.rank + sent.rank
    return LoraDelta.from_factors(factors, rank, float(rank), trained.base_fingerprint)


@dataclass
class Screened:
    key: object  # the caller's handle for this reply
    delta: LoraDelta  # possibly norm-bounded
    norm: float
    status: str  # ok | clipped | rejected
    reason: str = ""


def screen(items: list[tuple[object, LoraDelta, LoraDelta]], cfg: RobustConfig) -> list[Screened]:
    """`items`: (key, trained, sent) for every accepted reply of a round, all experts pooled."""
    norms = [update_norm(t, s) for _, t, s in items]
    out = []
    # torch's median of an even count is the lower middle value: with two replies the
    # reference is the smaller norm, so one boosted site of two still stands out.
    if cfg.method == "none" or len(items) < 2:
        return [Screened(k, t, n, "ok") for (k, t, _), n in zip(items, norms)]
    med = float(torch.tensor(norms).median())
    mad = float((torch.tensor(norms) - med).abs().median()) * 1.4826
    reject_at = max(med + cfg.outlier_z * mad, cfg.reject_factor * med)
    clip_at = cfg.clip_factor * med
    for (key, trained, sent), n in zip(items, norms):
        if not math.isfinite(n) or n > reject_at:
            out.append(Screened(key, trained, n, "rejected",
                                f"update norm {n:.3g} is an outlier (round median {med:.3g}, MAD {mad:.3g}, "
                                f"limit {reject_at:.3g})"))
        elif cfg.method == "norm" and n > clip_at > 0:  # factor statistics need factors of one rank
            out.append(Screened(key, shrink_update(trained, sent, clip_at / n), n, "clipped",
                                f"update norm {n:.3g} bounded to {clip_at:.3g}"))
        else:
            out.append(Screened(key, trained, n, "ok"))
    return out


def _padded_factors(updates: list[tuple[LoraDelta, float]], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[sites, r_max, in] A's and [sites, out, r_max] B's, each scaled by sqrt(s_k) (as FedIT)."""
    r_max = max(d.rank for d, _ in updates)
    As, Bs = [], []
    for delta, _ in updates:
        a, b = delta.factors(module)
        root = math.sqrt(delta.scaling)
        As.append(torch.nn.functional.pad(a.float() * root, (0, 0, 0, r_max - delta.rank)))
        Bs.append(torch.nn.functional.pad(b.float() * root, (0, r_max - delta.rank)))
    return torch.stack(As), torch.stack(Bs)


def trimmed_mean(x: torch.Tensor, trim: float) -> torch.Tensor:
    """Coordinate-wise mean over dim 0 after dropping the `trim` fraction at each end."""
    n = x.shape[0]
    k = min(int(math.floor(trim * n)), (n - 1) // 2)
    if k == 0:
        return x.mean(dim=0)
    return x.sort(dim=0).values[k:n - k].mean(dim=0)


def coordinate_aggregate(updates: list[tuple[LoraDelta, float]], method: str, trim: float = 0.2) -> dict[str, LowRank]:
    """Coordinate-wise trimmed mean or median of the factors (unweighted, as robust statistics are)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    out = {}
    for module in updates[0][0].modules():
        a, b = _padded_factors(updates, module)
        if method == "median":
            out[module] = LowRank(b.median(dim=0).values, a.median(dim=0).values)
        elif method == "trimmed-mean":
            out[module] = LowRank(trimmed_mean(b, trim), trimmed_mean(a, trim))
        else:
            raise FedmoeError(f"coordinate-wise aggregation has no method {method!r}")
    return out
