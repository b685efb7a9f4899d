"""Secure aggregation on the site (`--privacy secagg`): Flower's `secaggplus_mod` masks
the site's FFA-LoRA update before it leaves.

SecAgg+ in Flower 1.42 is the legacy workflow (`flwr.server.workflow.SecAggPlusWorkflow`
on the coordinator, fedmoe.server.federation.secagg): its four stages are TRAIN messages whose
`secaggplus` ConfigRecord says the stage. `secaggplus_mod` answers the key-exchange and
unmask stages itself and calls the ClientApp's train function once, in the
masked-vectors stage, with a legacy FitIns (`fitins.*` records). That call trains like
any other TRAIN (same site code, same daemon) and replies with a legacy FitRes whose
parameters are u = s (B_k - B_0) for each module (sorted), zero-padded to the expert's
rank `secagg-rank`, so every site's vector has the same shape and their weighted sum is
the exact FFA-LoRA aggregate. The mod quantizes and masks those arrays and clears them:
the coordinator receives only the masked integers.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

FITINS_CONFIG = "fitins.config"


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's `secaggplus_mod` for SecAgg+ stage messages; every other TRAIN (the
    modes without secure aggregation) goes straight to the train function."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secagg_fit(msg: Message) -> bool:
    """The masked-vectors stage hands the train function a legacy FitIns."""
    return FITINS_CONFIG in msg.content.config_records


def fit_reply(msg: Message, train) -> Message:
    """Answer the masked-vectors stage. `train(arrays, config)` is the site's usual TRAIN
    (in process or through the site daemon) and returns (arrays, meta, metrics)."""
    return Message(compat.fitres_to_recorddict(masked_input(msg.content, train), keep_input=False), reply_to=msg)


def masked_input(content, train) -> FitRes:
    """The FitRes `secaggplus_mod` quantizes and masks: the site's update u_k, padded."""
    import torch

    from fedmoe.shared import compression
    from fedmoe.shared.delta import b_update
    from fedmoe.shared.errors import DeltaValidationError
    from fedmoe.shared.fitins import adapter_from_fitins, update_to_parameters

    received, cfg = adapter_from_fitins(compat.recorddict_to_fitins(content, keep_input=True))
    arrays, meta = received.to_records()
    out_arrays, out_meta, metrics = train(arrays, ConfigRecord(cfg | dict(meta) | {"compression": "none"}))
    trained = compression.decode(out_arrays, out_meta, base=received if out_meta.get("relative", False) else None)
    update = b_update(trained, received, int(cfg["secagg-rank"]))
    if not all(bool(torch.isfinite(u).all()) for u in update.values()):
        # SecAgg+ would quantize NaN to garbage the coordinator cannot see: fail this site's
        # stage instead (the protocol then drops the site and unmasks the others' sum).
        raise DeltaValidationError("the trained update is not finite; not sending it to secure aggregation")
    return FitRes(Status(Code.OK, ""), update_to_parameters(update), int(metrics["num-examples"]), dict(metrics))
