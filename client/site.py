"""What a site does for each message, independent of transport.

The ClientApp (simulation and deployment) and the site daemon call these functions; a
site's settings come from its Flower node config (`data-path`, `domain`, `rank`,
`quant`, optional `model-path`, and the privacy policy `min-privacy`,
`min-noise-multiplier`, `max-clip`, which site.toml's `min_privacy`, `min_noise_multiplier`,
`max_clip` can only tighten: `policy`). The trainer is cached per process by (model, quant,
rank), never per site, so a long-lived process (simulation actor, site daemon) loads the
base model once and serves every site it is given. A site's data is read when a message
for it arrives and only the last `SITE_CACHE_SIZE` sites' data is kept: a simulation actor
that serves 1,000 sites holds a few sites' records, not all of them; a site daemon (one
site) reads its data once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from fedmoe.shared.data import Site, load_site
from fedmoe.shared.delta import LoraDelta
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.training import TrainConfig


@dataclass(frozen=True)
class SiteSettings:
    data_path: str
    domain: str | None = None
    rank: int = 8
    quant: str = "nf4"
    model_path: str | None = None
    min_privacy: str | None = None  # e.g. "dp" or "dp,secagg" (fedmoe.client.privacy.SitePolicy)
    min_noise_multiplier: float | None = None
    max_clip: float | None = None

    @classmethod
    def from_node_config(cls, cfg) -> "SiteSettings":
        if "data-path" not in cfg:
            raise FedmoeError("node config lacks 'data-path' (start the site with --data DIR)")
        return cls(str(cfg["data-path"]), cfg.get("domain") or None, int(cfg.get("rank", 8)),
                   str(cfg.get("quant", "nf4")), cfg.get("model-path") or None, cfg.get("min-privacy") or None,
                   cfg.get("min-noise-multiplier"), cfg.get("max-clip"))


SITE_CACHE_SIZE = 2  # a message's TRAIN then EVALUATE of one site reads its data once

_trainers: dict = {}
_sites: OrderedDict = OrderedDict()  # (data path, domain) -> Site, least recently used first
_feedback: dict = {}  # (data path, expert) -> ErrorFeedback: int8 residuals kept between rounds


def site_data(settings: SiteSettings) -> Site:
    key = (settings.data_path, settings.domain)
    if key in _sites:
        _sites.move_to_end(key)
        return _sites[key]
    site = _sites[key] = load_site(settings.data_path, settings.domain)
    while len(_sites) > SITE_CACHE_SIZE:
        _sites.popitem(last=False)
    return site


def policy(settings: SiteSettings):
    """The site's privacy policy: its settings' and its site.toml's, the stricter of both."""
    from fedmoe.client.privacy import SitePolicy

    own = SitePolicy.parse(settings.min_privacy, settings.min_noise_multiplier, settings.max_clip)
    return own.stricter(SitePolicy.from_site_toml(site_data(settings).settings, f"{settings.data_path}/site.toml"))


def trainer_for(settings: SiteSettings):
    from fedmoe.client.trainer import SiteTrainer

    model_dir = model_dir_for(settings)
    key = (model_dir, settings.quant, settings.rank)
    if key not in _trainers:
        _trainers[key] = SiteTrainer(model_dir, settings.quant, settings.rank)
    return _trainers[key]


def model_dir_for(settings: SiteSettings) -> str:
    if settings.model_path:
        return settings.model_path
    from fedmoe.shared.pretrain import ensure_default_model

    return str(ensure_default_model())


def describe(settings: SiteSettings) -> dict:
    """Who the site is, without loading the model: the fingerprint hashes the files, so
    the coordinator's first QUERY is answered in milliseconds, not a model load."""
    from fedmoe.shared.modeling import QUANT_MODES, model_fingerprint

    if settings.quant not in QUANT_MODES:
        raise FedmoeError(f"unknown quantization {settings.quant!r} in the site's node config: choose one of {', '.join(QUANT_MODES)}")
    site = site_data(settings)
    return {"site": Path(settings.data_path).name, "domain": site.domain, "rank": settings.rank, "quant": settings.quant,
            "fingerprint": model_fingerprint(model_dir_for(settings)), "num-examples": len(site.train)}


def train(settings: SiteSettings, delta: LoraDelta, cfg: TrainConfig, privacy: dict | None = None) -> tuple[LoraDelta, dict]:
    """`privacy` (from the TRAIN config): `freeze-a` trains lora_B only against the shared A;
    `dp-clip` clips the update s (B_k - B_0) to that norm (fedmoe.client.privacy). Under
    dp / secagg (declared or applied) or a policy accepting only those, the metrics are
    `num-examples` and `seconds` only: the training loss and token count stay here."""
    from contextlib import nullcontext

    from fedmoe.client.privacy import clip_b_update, frozen_lora_a, withholds_metrics

    privacy = privacy or {}
    withhold = withholds_metrics(privacy, policy(settings))
    site = site_data(settings)
    trainer = trainer_for(settings)
    trainer.set_adapter(delta)
    with frozen_lora_a(trainer.model) if privacy.get("freeze-a") else nullcontext():
        new, result = trainer.train(site.train, cfg)
    if privacy.get("freeze-a"):  # the pre-clip norm is data-dependent: it stays here
        new, _ = clip_b_update(new, delta, float(privacy.get("dp-clip", float("inf"))))
    if withhold:
        return new, {"num-examples": len(site.train), "seconds": result.seconds}
    return new, {"num-examples": len(site.train), "train-loss": result.final_loss, "seconds": result.seconds,
                 "tokens": result.tokens}


def evaluate(settings: SiteSettings, delta: LoraDelta, cfg=None) -> dict:
    """The site's accuracy and loss on its eval split; refused (SitePolicyError) where the
    policy or the declared privacy mode withholds per-site metrics."""
    policy(settings).check_evaluate(cfg or {})
    site = site_data(settings)
    trainer = trainer_for(settings)
    trainer.set_adapter(delta)
    if not site.eval:
        return {"num-examples": 0}
    r = trainer.evaluate(site.eval)
    accuracy = r.accuracy
    if all(rec.choices for rec in site.eval):  # multiple choice: acc_norm, the report's headline
        from fedmoe.shared.multiple_choice import score_records

        accuracy = score_records(trainer.model, trainer.tokenizer, site.eval).acc_norm
    return {"num-examples": r.count, "eval-accuracy": accuracy, "eval-loss": r.loss}


def encode_reply(settings: SiteSettings, expert: str, received: LoraDelta, trained: LoraDelta, codec: str):
    """(ArrayRecord, ConfigRecord) of the trained adapter in `codec`. Compressed replies
    are relative to the received adapter; int8 carries this site's error feedback."""
    from fedmoe.shared import compression

    if codec == "none":
        return compression.encode(trained, "none")[:2]
    feedback = None
    if codec == "int8":
        feedback = _feedback.setdefault((settings.data_path, expert), compression.ErrorFeedback())
    return compression.encode(trained, codec, base=received, feedback=feedback)[:2]
