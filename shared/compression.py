"""Wire codecs for LoRA deltas: `none` (fp32), `fp16`, `int8` (+ error feedback).

`int8` quantizes each factor with one absmax scale per LoRA component — a row of A
([r, in]) or a column of B ([out, r]): the rank axis is the channel axis of a
factor. (One scale per output row of B would cost 4·out bytes per module, half the
int8 payload at r = 8, and break the 0.27x budget; per component it is 8·r bytes.) All
int8 factors of a delta travel as one flat int8 array plus one flat fp32 array of
scales, so the per-array header of the Flower/NumPy encoding is paid twice, not twice
per module.

A reply may be *relative*: the site sends trained − received (the update, which is
small) instead of the trained factors, and the coordinator adds it back to what it sent
(which both sides hold bit for bit, having decoded the same message). `ErrorFeedback`,
kept on the site between rounds, adds what quantization dropped last round to the next
update before quantizing it (EF-SGD), so the error does not accumulate as bias.

Every codec decodes to a float32 `LoraDelta` before validation; `checksum` in the
metadata is that of the decoded delta, so the receiver still checks it end to end.
"""

from __future__ import annotations

import math

import torch

from fedmoe.shared.delta import A_SUFFIX, B_SUFFIX, LoraDelta
from fedmoe.shared.errors import DeltaValidationError, FedmoeError

CODECS = ("none", "fp16", "int8")
PAYLOAD, SCALES = "int8-payload", "int8-scales"


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise FedmoeError(f"unknown compression {codec!r}: choose one of {', '.join(CODECS)}")
    return codec


def channel_axis(key: str) -> int:
    """The rank axis of a factor: rows of A, columns of B."""
    if key.endswith(A_SUFFIX):
        return 0
    if key.endswith(B_SUFFIX):
        return 1
    raise DeltaValidationError(f"tensor {key!r} is not a LoRA factor")


def quantize_int8(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scales along `axis`), x ≈ q * scale."""
    x = x.float()
    reduce = 1 - axis
    scale = x.abs().amax(dim=reduce) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe.unsqueeze(reduce)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    return q.float() * scale.unsqueeze(1 - axis)


class ErrorFeedback:
    """What quantization dropped, per tensor, added to the next update of the same expert.

    A residual whose shape no longer matches (the site's rank changed) is dropped."""

    def __init__(self):
        self.residual: dict[str, torch.Tensor] = {}

    def compensate(self, key: str, x: torch.Tensor) -> torch.Tensor:
        r = self.residual.get(key)
        return x + r if r is not None and r.shape == x.shape else x

    def update(self, key: str, compensated: torch.Tensor, sent: torch.Tensor) -> None:
        self.residual[key] = (compensated - sent).detach().clone()

    def norm(self) -> float:
        return math.sqrt(sum(float(r.double().pow(2).sum()) for r in self.residual.values()))


def _meta(delta: LoraDelta, codec: str, checksum: str, base: LoraDelta | None) -> dict:
    meta = {"rank": int(delta.rank), "alpha": float(delta.alpha), "base-fingerprint": delta.base_fingerprint,
            "checksum": checksum, "codec": codec, "relative": base is not None}
    if base is not None:
        meta["relative-to"] = base.checksum()
    return meta


def encode(delta: LoraDelta, codec: str = "none", base: LoraDelta | None = None,
           feedback: ErrorFeedback | None = None):
    """(ArrayRecord, ConfigRecord, decoded): the records to send and the float32 delta the
    receiver will decode from them. `base` given: send `delta - base` (the receiver must
    hold the same `base`). `feedback` given: error feedback for int8."""
    from flwr.app import ArrayRecord, ConfigRecord

    check_codec(codec)
    if codec == "none" and base is None:
        arrays, meta = delta.to_records()
        return arrays, ConfigRecord(dict(meta) | {"codec": "none", "relative": False}), delta
    if base is not None and (base.rank != delta.rank or set(base.tensors) != set(delta.tensors)):
        raise FedmoeError("relative encoding needs a base with the same rank and tensors")
    keys = sorted(delta.tensors)
    diff = {k: delta.tensors[k].float() - (base.tensors[k].float() if base is not None else 0.0) for k in keys}
    sent: dict[str, torch.Tensor] = {}
    if codec == "int8":
        payload, scales = [], []
        for k in keys:
            x = feedback.compensate(k, diff[k]) if feedback is not None else diff[k]
            q, s = quantize_int8(x, channel_axis(k))
            sent[k] = dequantize_int8(q, s, channel_axis(k))
            if feedback is not None:
                feedback.update(k, x, sent[k])
            payload.append(q.reshape(-1))
            scales.append(s)
        arrays = ArrayRecord({PAYLOAD: torch.cat(payload), SCALES: torch.cat(scales)})
        extra = {"tensor-keys": keys, "tensor-shapes": [int(n) for k in keys for n in diff[k].shape]}
    else:
        dtype = torch.float16 if codec == "fp16" else torch.float32
        wire = {k: diff[k].to(dtype).contiguous() for k in keys}
        sent = {k: v.float() for k, v in wire.items()}
        arrays, extra = ArrayRecord(wire), {}
    decoded = _reconstruct(sent, delta, base)
    config = ConfigRecord(_meta(delta, codec, decoded.checksum(), base) | extra)
    return arrays, config, decoded


def _reconstruct(sent: dict[str, torch.Tensor], like: LoraDelta, base: LoraDelta | None) -> LoraDelta:
    tensors = {k: (v + base.tensors[k].float() if base is not None else v) for k, v in sent.items()}
    return LoraDelta(tensors, like.rank, like.alpha, like.base_fingerprint)


def decode(arrays, config, base: LoraDelta | None = None) -> LoraDelta:
    """The float32 `LoraDelta` in (arrays, config), whatever codec it was sent with.
    A relative delta needs the `base` it was made against."""
    codec = str(config.get("codec", "none"))
    if codec not in CODECS:
        raise DeltaValidationError(f"delta uses unknown codec {codec!r}")
    raw = LoraDelta.from_records(arrays, config) if codec != "int8" else None
    for key in ("rank", "alpha", "base-fingerprint"):
        if key not in config:
            raise DeltaValidationError(f"delta metadata lacks {key!r}")
    if codec == "int8":
        sent = _unpack_int8(arrays, config)
    else:
        sent = {k: v.float() for k, v in raw.tensors.items()}
    relative = bool(config.get("relative", False))
    if relative:
        if base is None:
            raise DeltaValidationError("delta is relative to an adapter the receiver does not hold")
        if str(config.get("relative-to", "")) != base.checksum():
            raise DeltaValidationError("delta is relative to a different adapter than the one sent")
        missing = set(sent) ^ set(base.tensors)
        if missing:
            raise DeltaValidationError(f"relative delta and its base differ in tensor {sorted(missing)[0]!r}")
        for k in sent:
            if sent[k].shape != base.tensors[k].shape:
                raise DeltaValidationError(f"tensor {k!r} has shape {list(sent[k].shape)}, its base {list(base.tensors[k].shape)}")
    like = LoraDelta({}, int(config["rank"]), float(config["alpha"]), str(config["base-fingerprint"]))
    delta = _reconstruct(sent, like, base if relative else None)
    if "checksum" in config:
        delta.meta["checksum"] = str(config["checksum"])
    return delta


def _unpack_int8(arrays, config) -> dict[str, torch.Tensor]:
    try:
        keys = [str(k) for k in config["tensor-keys"]]
        shapes = [int(n) for n in config["tensor-shapes"]]
        payload = arrays[PAYLOAD].numpy()
        scales = arrays[SCALES].numpy()
    except KeyError as exc:
        raise DeltaValidationError(f"int8 delta lacks {exc.args[0]!r}") from None
    if len(shapes) != 2 * len(keys):
        raise DeltaValidationError("int8 delta: tensor-shapes does not give two dimensions per tensor")
    if str(payload.dtype) != "int8" or str(scales.dtype) != "float32":
        raise DeltaValidationError(f"int8 delta: payload/scales have dtypes {payload.dtype}/{scales.dtype}, expected int8/float32")
    payload, scales = torch.from_numpy(payload.reshape(-1).copy()), torch.from_numpy(scales.reshape(-1).copy())
    out, pos, spos = {}, 0, 0
    for i, k in enumerate(keys):
        shape = (shapes[2 * i], shapes[2 * i + 1])
        axis = channel_axis(k)
        n, ns = shape[0] * shape[1], shape[axis]
        if pos + n > payload.numel() or spos + ns > scales.numel():
            raise DeltaValidationError(f"int8 delta: payload too short for tensor {k!r} of shape {list(shape)}")
        out[k] = dequantize_int8(payload[pos:pos + n].reshape(shape), scales[spos:spos + ns], axis)
        pos, spos = pos + n, spos + ns
    if pos != payload.numel() or spos != scales.numel():
        raise DeltaValidationError("int8 delta: payload longer than its tensors")
    return out


def record_bytes(arrays) -> int:
    """Bytes the arrays take in a Flower message (each Array's serialized data)."""
    return sum(len(a.data) for a in arrays.values())
