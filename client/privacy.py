"""Privacy on the site's update, before it leaves (frozen-A / FFA-LoRA modes).

In the `dp` and `secagg` privacy modes the coordinator sends a shared A that sites do
not train (FFA-LoRA): ΔW_k = s (B_k - B_0) A, so the federation's update is linear in
the sites' B changes, the sum of site messages *is* the exact aggregate, and clipping
B's change clips exactly what is summed. The site clips its update
u_k = s (B_k - B_0) (all modules together, Frobenius norm) to `clip` before replying —
Flower's client-side fixed clipping, applied to the quantity our aggregate is linear in.

The site's own policy (`SitePolicy`, below) says which modes it trains under at all.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedmoe.shared.delta import LoraDelta
from fedmoe.shared.errors import FedmoeError, SitePolicyError
from fedmoe.shared.privacy_modes import AT_LEAST, METRICS_WITHHELD, MODES


@contextmanager
def frozen_lora_a(model):
    """Train only lora_B: the shared A stays exactly what the coordinator sent."""
    params = [p for n, p in model.named_parameters() if "lora_A" in n]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


def b_update_norm(trained: LoraDelta, received: LoraDelta) -> float:
    total = 0.0
    for m in trained.modules():
        _, bt = trained.factors(m)
        _, b0 = received.factors(m)
        total += float(((bt.double() * trained.scaling - b0.double() * received.scaling) ** 2).sum())
    return math.sqrt(total)


def clip_b_update(trained: LoraDelta, received: LoraDelta, clip: float) -> tuple[LoraDelta, float]:
    """(B_0 + c (B_k - B_0) with the received A, norm before clipping); c = min(1, clip / norm)."""
    if trained.rank != received.rank or trained.alpha != received.alpha:
        raise FedmoeError("frozen-A reply must keep the received rank and alpha")
    norm = b_update_norm(trained, received)
    c = min(1.0, clip / norm) if norm > 0 else 1.0
    factors = {}
    for m in trained.modules():
        a0, b0 = received.factors(m)
        _, bt = trained.factors(m)
        factors[m] = (a0.float().clone(), (b0.float() + c * (bt.float() - b0.float())).contiguous())
    return LoraDelta.from_factors(factors, trained.rank, trained.alpha, trained.base_fingerprint), norm


# -- the site's own policy: which privacy modes it trains under ----------------------------

@dataclass(frozen=True)
class SitePolicy:
    """What a site accepts (`fedmoe site start --min-privacy`, or site.toml `min_privacy`):
    the privacy modes it trains under, and for `dp` a noise-multiplier floor and for
    `dp`/`secagg` a largest clip. The site checks each TRAIN against it before touching
    its data (`check_train`) and never sends an update for a refused one.

    What the site can verify itself it does (it freezes A and clips its own update; the
    reply's metrics are its own). The noise (dp) and the masking (secagg) are done by the
    coordinator and by the ClientApp it ships: those the policy holds the coordinator to
    as declared in the TRAIN config, which the site's audit log records."""

    accepted: frozenset = frozenset(MODES)
    min_noise_multiplier: float = 0.0
    max_clip: float | None = None

    @classmethod
    def parse(cls, min_privacy=None, min_noise_multiplier=None, max_clip=None, where: str = "--min-privacy") -> "SitePolicy":
        """`min_privacy`: a mode, or several ("dp,secagg" or a list): the site accepts every
        mode at least as private as one of them (fedmoe.shared.privacy_modes.AT_LEAST)."""
        accepted = set(MODES)
        if min_privacy not in (None, ""):
            names = min_privacy.split(",") if isinstance(min_privacy, str) else list(min_privacy)
            names = [str(n).strip() for n in names]
            if not names or any(n not in MODES for n in names):
                bad = next((n for n in names if n not in MODES), "")
                raise FedmoeError(f"{where}: unknown privacy mode {bad!r}: choose from {', '.join(MODES)} (comma-separated)")
            accepted = {m for n in names for m in AT_LEAST[n]}
        floor = 0.0 if min_noise_multiplier is None else _number(min_noise_multiplier, "min noise multiplier", where)
        if floor < 0:
            raise FedmoeError(f"{where}: min noise multiplier must be >= 0, got {floor}")
        clip = None if max_clip is None else _number(max_clip, "max clip", where)
        if clip is not None and not clip > 0:
            raise FedmoeError(f"{where}: max clip must be > 0, got {clip}")
        return cls(frozenset(accepted), floor, clip)

    @classmethod
    def from_site_toml(cls, settings: dict, where: str = "site.toml") -> "SitePolicy":
        return cls.parse(settings.get("min_privacy"), settings.get("min_noise_multiplier"), settings.get("max_clip"),
                         where=f"{where} min_privacy")

    def stricter(self, other: "SitePolicy") -> "SitePolicy":
        """Both policies at once (the command line and site.toml): neither can loosen the other."""
        accepted = self.accepted & other.accepted
        if not accepted:
            raise FedmoeError(f"the site's privacy policies accept no mode in common ({self.text()} vs {other.text()})")
        clips = [c for c in (self.max_clip, other.max_clip) if c is not None]
        return SitePolicy(frozenset(accepted), max(self.min_noise_multiplier, other.min_noise_multiplier),
                          min(clips) if clips else None)

    @property
    def open(self) -> bool:
        return self == SitePolicy()

    @property
    def withholds_metrics(self) -> bool:
        """A site that trains only under dp/secagg never sends a loss or an accuracy."""
        return self.accepted <= set(METRICS_WITHHELD)

    def text(self) -> str:
        parts = ["accepts " + ", ".join(m for m in MODES if m in self.accepted)]
        if self.min_noise_multiplier and "dp" in self.accepted:
            parts.append(f"dp noise multiplier >= {self.min_noise_multiplier:g}")
        if self.max_clip is not None:
            parts.append(f"clip <= {self.max_clip:g}")
        return "; ".join(parts)

    def check_train(self, cfg) -> str:
        """The TRAIN's privacy mode as the site will apply it, or SitePolicyError."""
        mode = train_privacy_mode(cfg)
        why = None
        if mode not in self.accepted:
            declared = cfg.get("privacy")
            why = f"privacy mode {mode}" + (f" (declared {declared!r})" if declared not in (None, mode) else "")
        elif mode == "dp" and float(cfg["dp-noise-multiplier"]) < self.min_noise_multiplier:
            why = f"dp noise multiplier {float(cfg['dp-noise-multiplier']):g} < {self.min_noise_multiplier:g}"
        elif mode in ("dp", "secagg") and self.max_clip is not None and float(cfg["dp-clip"]) > self.max_clip:
            why = f"clip {float(cfg['dp-clip']):g} > {self.max_clip:g}"
        if why:
            raise SitePolicyError(f"site policy: refused to train under {why}; this site {self.text()}")
        return mode

    def check_evaluate(self, cfg) -> None:
        """EVALUATE replies carry the site's accuracy and loss: refused where the policy or the
        run's declared mode withholds per-site metrics."""
        declared = cfg.get("privacy")
        if self.withholds_metrics or declared in METRICS_WITHHELD:
            raise SitePolicyError("site policy: no evaluation metrics leave this site under "
                                  + (f"privacy {declared}" if declared in METRICS_WITHHELD else f"its policy ({self.text()})"))


def _number(value, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise FedmoeError(f"{where}: {what} must be a number, got {value!r}")
    try:
        out = float(value)
    except ValueError:
        raise FedmoeError(f"{where}: {what} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise FedmoeError(f"{where}: {what} must be finite, got {value!r}")
    return out


def train_privacy_mode(cfg) -> str:
    """The privacy mode a TRAIN gets here: the declared `privacy` where what the site is
    asked to do matches it, else the weakest mode consistent with the request (no frozen A:
    none; frozen A but no clip: ffa; dp without a declared noise multiplier: ffa)."""
    if not cfg.get("freeze-a"):
        return "none"
    declared = cfg.get("privacy")
    if "dp-clip" not in cfg:
        return "ffa"
    if declared == "secagg":
        return "secagg"
    if declared == "dp" and isinstance(cfg.get("dp-noise-multiplier"), (int, float)) and cfg["dp-noise-multiplier"] > 0:
        return "dp"
    return "ffa"


def withholds_metrics(cfg, policy: SitePolicy) -> bool:
    """Whether a TRAIN reply leaves out the per-site loss and token count: under dp or
    secagg (declared, or as the site applies it) or a policy that accepts only those."""
    return (cfg.get("privacy") in METRICS_WITHHELD or train_privacy_mode(cfg) in METRICS_WITHHELD
            or policy.withholds_metrics)
