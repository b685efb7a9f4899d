"""The site's two jobs, TRAIN and EVALUATE, run in this process: the ClientApp calls them
in simulation, the site daemon calls them deployed, so both paths are one."""

from __future__ import annotations


def train_config(cfg):
    from fedmoe.shared.training import TrainConfig

    return TrainConfig(steps=int(cfg["steps"]), batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]),
                       seed=int(cfg["seed"]), prox_mu=float(cfg.get("prox-mu", 0.0)),
                       schedule=str(cfg.get("lr-schedule", "constant")), global_step=int(cfg.get("global-step", 0)),
                       total_steps=int(cfg.get("total-steps", 0)), warmup=float(cfg.get("warmup", 0.1)))


PRIVACY_KEYS = ("privacy", "freeze-a", "dp-clip", "dp-noise-multiplier")


def train_in_process(settings, arrays, cfg, chaos: dict | None = None):
    """One TRAIN, here: check it against the site's privacy policy (a refused TRAIN raises
    SitePolicyError before the adapter is read: no update is computed or sent), decode the
    received adapter, train with the config's privacy options, encode the reply. The site
    daemon calls this too, so both paths are one."""
    from fedmoe.client import site
    from fedmoe.shared import compression

    site.policy(settings).check_train(cfg)
    received = compression.decode(arrays, cfg)
    trained, metrics = site.train(settings, received, train_config(cfg), {k: cfg[k] for k in PRIVACY_KEYS if k in cfg})
    if chaos is not None:
        from fedmoe.client.chaos import corrupt_for

        trained = corrupt_for(chaos, cfg, site.describe(settings)["site"], trained)
    out_arrays, meta = site.encode_reply(settings, str(cfg.get("expert", "")), received, trained,
                                         str(cfg.get("compression", "none")))
    return out_arrays, meta, metrics


def evaluate_in_process(settings, arrays, cfg) -> dict:
    from fedmoe.client import site
    from fedmoe.shared.delta import LoraDelta

    return site.evaluate(settings, LoraDelta.from_records(arrays, cfg), cfg)
