"""The Flower ClientApp: a thin shim from Flower messages to `fedmoe.client.site`.

QUERY `describe` answers who the site is; TRAIN sets the received adapter, trains the
configured steps and replies with the trained adapter, `num-examples` and metrics;
EVALUATE reports local accuracy and loss. In simulation, `plan` maps each virtual
node's partition id to its site settings; deployed, they come from the node config.

Deployed with `fedmoe site start`, the node config has `daemon-address` and every
message is forwarded to the site daemon (fedmoe.client.daemon), which keeps the model
loaded across rounds; this process then imports neither torch nor the site code.
Without it (simulation, or a bare SuperNode given `data-path`) the site code runs here.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmoe.client import daemon

DAEMON_TIMEOUT = 24 * 3600.0  # the coordinator's round deadline is what bounds a round


def settings_for(context: Context, plan: list[dict] | None):
    from fedmoe.client import site

    cfg = dict(context.node_config)
    if plan is not None:
        cfg = plan[int(cfg["partition-id"])]
    return site.SiteSettings.from_node_config(cfg)


def daemon_for(context: Context, plan: list[dict] | None) -> str | None:
    if plan is not None:
        return None
    address = context.node_config.get("daemon-address")
    return str(address) if address else None


def train_config(cfg):
    from fedmoe.shared.training import TrainConfig

    return TrainConfig(steps=int(cfg["steps"]), batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]),
                       seed=int(cfg["seed"]), prox_mu=float(cfg.get("prox-mu", 0.0)))


def build_client_app(plan: list[dict] | None = None) -> ClientApp:
    app = ClientApp()

    @app.query("describe")
    def describe(msg: Message, context: Context) -> Message:
        if address := daemon_for(context, plan):
            info = daemon.forward_describe(address, context.run_id, DAEMON_TIMEOUT)
        else:
            from fedmoe.client import site

            info = site.describe(settings_for(context, plan))
        return Message(RecordDict({"config": ConfigRecord(info)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        if address := daemon_for(context, plan):
            arrays, meta, metrics = daemon.forward_train(address, msg.content["arrays"], cfg, context.run_id, DAEMON_TIMEOUT)
        else:
            from fedmoe.client import site
            from fedmoe.shared import compression

            settings = settings_for(context, plan)
            received = compression.decode(msg.content["arrays"], cfg)
            trained, metrics = site.train(settings, received, train_config(cfg),
                                          {k: cfg[k] for k in ("freeze-a", "dp-clip") if k in cfg})
            if plan is not None and "chaos" in (entry := plan[int(context.node_config["partition-id"])]):
                from fedmoe.client.chaos import corrupt_for

                trained = corrupt_for(entry, cfg, site.describe(settings)["site"], trained)
            arrays, meta = site.encode_reply(settings, str(cfg.get("expert", "")), received, trained,
                                             str(cfg.get("compression", "none")))
        return Message(RecordDict({"arrays": arrays, "config": meta, "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        if address := daemon_for(context, plan):
            metrics = daemon.forward_evaluate(address, msg.content["arrays"], msg.content["config"], context.run_id,
                                              DAEMON_TIMEOUT)
        else:
            from fedmoe.client import site
            from fedmoe.shared.delta import LoraDelta

            received = LoraDelta.from_records(msg.content["arrays"], msg.content["config"])
            metrics = site.evaluate(settings_for(context, plan), received)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


app = build_client_app()
