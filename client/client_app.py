"""The Flower ClientApp: a thin shim from Flower messages to `fedmoe.client.site`.

QUERY `describe` answers who the site is; TRAIN sets the received adapter, trains the
configured steps and replies with the trained adapter, `num-examples` and metrics;
EVALUATE reports local accuracy and loss. With `--privacy secagg` the TRAIN messages are
Flower's SecAgg+ stages and `secaggplus_mod` masks the update (fedmoe.client.secagg).
In simulation, `plan` maps each virtual node's partition id to its site settings;
deployed, they come from the node config.

Deployed with `fedmoe site start`, the node config has `daemon-address` and every
message is forwarded to the site daemon (fedmoe.client.daemon), which keeps the model
loaded across rounds; this process then imports neither torch nor the site code.
Without it (simulation, or a bare SuperNode given `data-path`) the site code runs here.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmoe.client import daemon, secagg
from fedmoe.client.jobs import evaluate_in_process, train_in_process
from fedmoe.shared.errors import SitePolicyError

POLICY_REFUSAL = 1000  # Error code of a message the site refuses under its privacy policy (Flower's are < 100)

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

    def train_records(arrays, cfg, context: Context):
        if address := daemon_for(context, plan):
            return daemon.forward_train(address, arrays, cfg, context.run_id, DAEMON_TIMEOUT)
        chaos = None
        if plan is not None and "chaos" in (entry := plan[int(context.node_config["partition-id"])]):
            chaos = entry
        return train_in_process(settings_for(context, plan), arrays, cfg, chaos)

    @app.train(mods=[secagg.secagg_mod])
    def train(msg: Message, context: Context) -> Message:
        if secagg.is_secagg_fit(msg):  # --privacy secagg: SecAgg+ masks what this returns
            return secagg.fit_reply(msg, lambda arrays, cfg: train_records(arrays, cfg, context))
        try:
            arrays, meta, metrics = train_records(msg.content["arrays"], msg.content["config"], context)
        except SitePolicyError as exc:  # refused: no update; the reason, in one line, is the reply
            return Message(Error(code=POLICY_REFUSAL, reason=str(exc)), reply_to=msg)
        return Message(RecordDict({"arrays": arrays, "config": meta, "metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        try:
            if address := daemon_for(context, plan):
                metrics = daemon.forward_evaluate(address, msg.content["arrays"], msg.content["config"], context.run_id,
                                                  DAEMON_TIMEOUT)
            else:
                metrics = evaluate_in_process(settings_for(context, plan), msg.content["arrays"], msg.content["config"])
        except SitePolicyError as exc:
            return Message(Error(code=POLICY_REFUSAL, reason=str(exc)), reply_to=msg)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


app = build_client_app()
