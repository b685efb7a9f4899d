"""The Flower ClientApp: a thin shim from Flower messages to `fedmoe.client.site`.

QUERY `describe` answers who the site is; TRAIN sets the received adapter, trains the
configured steps and replies with the trained adapter, `num-examples` and metrics;
EVALUATE reports local accuracy and loss. In simulation, `plan` maps each virtual
node's partition id to its site settings; deployed, they come from the node config.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmoe.client import site
from fedmoe.shared import compression
from fedmoe.shared.delta import LoraDelta
from fedmoe.shared.training import TrainConfig


def settings_for(context: Context, plan: list[dict] | None) -> site.SiteSettings:
    cfg = dict(context.node_config)
    if plan is not None:
        cfg = plan[int(cfg["partition-id"])]
    return site.SiteSettings.from_node_config(cfg)


def train_config(cfg) -> TrainConfig:
    return TrainConfig(steps=int(cfg["steps"]), batch_size=int(cfg["batch-size"]), lr=float(cfg["lr"]),
                       seed=int(cfg["seed"]), prox_mu=float(cfg.get("prox-mu", 0.0)))


def build_client_app(plan: list[dict] | None = None) -> ClientApp:
    app = ClientApp()

    @app.query("describe")
    def describe(msg: Message, context: Context) -> Message:
        info = site.describe(settings_for(context, plan))
        return Message(RecordDict({"config": ConfigRecord(info)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = msg.content["config"]
        settings = settings_for(context, plan)
        received = compression.decode(msg.content["arrays"], cfg)
        trained, metrics = site.train(settings, received, train_config(cfg))
        arrays, meta = site.encode_reply(settings, str(cfg.get("expert", "")), received, trained,
                                         str(cfg.get("compression", "none")))
        return Message(RecordDict({"arrays": arrays, "config": meta, "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        received = LoraDelta.from_records(msg.content["arrays"], msg.content["config"])
        metrics = site.evaluate(settings_for(context, plan), received)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


app = build_client_app()
