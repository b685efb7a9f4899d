"""Wire codecs for LoRA deltas: fp16 and int8 (per-component scales, error feedback)."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedmoe.client import site
from fedmoe.server.federation.strategy import DomainExpertStrategy, Node, StrategyConfig
from fedmoe.shared import compression as C
from fedmoe.shared.delta import AdapterSpec, LoraDelta
from fedmoe.shared.errors import DeltaValidationError, FedmoeError

MODULES = {"l.0.q_proj": (64, 64), "l.0.v_proj": (64, 32)}
SPEC = AdapterSpec(MODULES)


pytestmark = pytest.mark.usefixtures("flower_task_identity")


def random_delta(rank=8, seed=0, scale=0.1) -> LoraDelta:
    g = torch.Generator().manual_seed(seed)
    return LoraDelta.from_factors({m: (scale * torch.randn(rank, i, generator=g), scale * torch.randn(o, rank, generator=g))
                                   for m, (i, o) in MODULES.items()}, rank, 2.0 * rank, "fp")


def max_err(a: LoraDelta, b: LoraDelta) -> float:
    return max(float((a.tensors[k] - b.tensors[k]).abs().max()) for k in a.tensors)


@pytest.mark.parametrize("codec, tol", [("none", 0.0), ("fp16", 1e-3), ("int8", 0.5 / 127)])
def test_roundtrip_decodes_to_float32_that_validates(codec, tol):
    d = random_delta()
    arrays, config, expected = C.encode(d, codec)
    out = C.decode(arrays, config)
    out.validate(SPEC, "fp")  # checksum of the decoded delta checked end to end
    assert all(t.dtype == torch.float32 for t in out.tensors.values())
    assert out.checksum() == expected.checksum()
    for k, t in d.tensors.items():  # int8: error at most half a step of the component's scale
        step = t.abs().amax(dim=1 - C.channel_axis(k), keepdim=True) if codec == "int8" else t.abs().max()
        assert float(((out.tensors[k] - t).abs() / step).max()) <= tol + 1e-6


def test_int8_is_a_quarter_of_fp32_on_the_wire():
    # The default model's shapes (hidden 192, rank 8); each Flower array also carries a
    # ~128-byte header, which int8 pays twice per delta, fp32 twice per module.
    g = torch.Generator().manual_seed(0)
    d = LoraDelta.from_factors({f"l.{i}.q_proj": (torch.randn(8, 192, generator=g), torch.randn(192, 8, generator=g))
                                for i in range(4)}, 8, 16.0, "fp")
    sizes = {codec: C.record_bytes(C.encode(d, codec)[0]) for codec in C.CODECS}
    assert sizes["int8"] <= 0.27 * sizes["none"]
    assert sizes["fp16"] <= 0.52 * sizes["none"]
    arrays, _, _ = C.encode(d, "int8")
    assert {k: a.dtype for k, a in arrays.items()} == {C.PAYLOAD: "int8", C.SCALES: "float32"}


def test_scales_are_per_lora_component():
    x = torch.zeros(4, 10)
    x[2] = 1000.0  # one large component does not crush the others' precision
    x[0, 0] = 1e-3
    q, s = C.quantize_int8(x, axis=0)
    assert s.shape == (4,) and s[1] == 0
    assert torch.allclose(C.dequantize_int8(q, s, 0), x)


def test_relative_reply_needs_the_adapter_it_was_made_against():
    sent, trained = random_delta(seed=1), random_delta(seed=2)
    arrays, config, _ = C.encode(trained, "int8", base=sent)
    assert max_err(C.decode(arrays, config, base=sent), trained) < 0.01
    with pytest.raises(DeltaValidationError, match="does not hold"):
        C.decode(arrays, config)
    with pytest.raises(DeltaValidationError, match="different adapter"):
        C.decode(arrays, config, base=random_delta(seed=3))


def test_relative_int8_is_finer_than_absolute_for_small_updates():
    sent = random_delta(seed=1)
    trained = LoraDelta({k: v + 1e-3 * torch.randn_like(v) for k, v in sent.tensors.items()}, 8, 16.0, "fp")
    absolute = C.decode(*C.encode(trained, "int8")[:2])
    relative = C.decode(*C.encode(trained, "int8", base=sent)[:2], base=sent)
    assert max_err(relative, trained) < max_err(absolute, trained) / 20


def test_error_feedback_keeps_the_running_sum_unbiased():
    # The same small update every round: without feedback int8 rounds it the same way
    # every time; with it the transmitted sum stays within one step of the true sum.
    base = random_delta(seed=1)
    step = {k: 0.3 * v / 127 + 1e-4 for k, v in random_delta(seed=4).tensors.items()}
    trained = LoraDelta({k: base.tensors[k] + step[k] for k in step}, 8, 16.0, "fp")
    fb = C.ErrorFeedback()
    sums = {"ef": 0.0, "plain": 0.0}
    for _ in range(20):
        for name, feedback in (("ef", fb), ("plain", None)):
            got = C.decode(*C.encode(trained, "int8", base=base, feedback=feedback)[:2], base=base)
            sums[name] += sum(float((got.tensors[k] - base.tensors[k] - step[k]).sum()) for k in step)
    assert abs(sums["ef"]) < abs(sums["plain"]) / 5
    assert fb.norm() > 0


@pytest.mark.parametrize("mutate, message", [
    (lambda a, c: c.__setitem__("tensor-shapes", [8, 64]), "two dimensions"),
    (lambda a, c: a.__setitem__(C.PAYLOAD, ArrayRecord({"x": torch.zeros(5, dtype=torch.int8)})["x"]), "too short"),
    (lambda a, c: c.__setitem__("codec", "int4"), "unknown codec"),
    (lambda a, c: a.__delitem__(C.SCALES), "lacks"),
])
def test_malformed_int8_rejected_one_line(mutate, message):
    arrays, config, _ = C.encode(random_delta(), "int8")
    mutate(arrays, config)
    with pytest.raises(DeltaValidationError, match=message):
        C.decode(arrays, config)


def test_tampered_payload_fails_checksum():
    arrays, config, _ = C.encode(random_delta(), "int8")
    q = arrays[C.PAYLOAD].numpy().copy()
    q[0] = q[0] + 1 if q[0] < 127 else q[0] - 1
    arrays[C.PAYLOAD] = ArrayRecord({"x": torch.from_numpy(q)})["x"]
    with pytest.raises(DeltaValidationError, match="checksum"):
        C.decode(arrays, config).validate(SPEC, "fp")


def test_unknown_compression_is_a_config_error():
    with pytest.raises(FedmoeError, match="unknown compression"):
        DomainExpertStrategy(StrategyConfig(compression="int4"), SPEC, "fp")


@pytest.mark.parametrize("codec", C.CODECS)
def test_strategy_round_trip_counts_encoded_bytes(codec):
    """Coordinator encodes, the site decodes, trains, replies in the same codec (relative,
    with error feedback kept per expert), and the coordinator decodes and aggregates."""
    s = DomainExpertStrategy(StrategyConfig(compression=codec), SPEC, "fp")
    for i in (1, 2):
        assert s.add_node(Node(i, f"site-{i}", "law", 8, "fp", 10)) is None
    sent = s.configure_train(1)
    replies = []
    for expert, node, msg in sent:
        cfg = msg.content["config"]
        assert cfg["compression"] == codec
        received = C.decode(msg.content["arrays"], cfg)
        received.validate(SPEC, "fp")
        trained = LoraDelta({k: v + 0.01 for k, v in received.tensors.items()}, 8, received.alpha, "fp")
        settings = site.SiteSettings(data_path=f"/nowhere/{codec}/{node.node_id}")
        arrays, meta = site.encode_reply(settings, expert, received, trained, codec)
        replies.append(Message(RecordDict({"arrays": arrays, "config": meta,
                                           "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0})}), reply_to=msg))
    result = s.aggregate_train(1, sent, replies)
    assert [p["status"] for p in result.participation] == ["ok", "ok"], result.participation
    fp32 = C.record_bytes(C.encode(random_delta(rank=8), "none")[0])
    for p, (_, _, msg), reply in zip(result.participation, sent, replies):
        assert p["bytes_out"] == C.record_bytes(msg.content["arrays"])
        assert p["bytes_in"] == C.record_bytes(reply.content["arrays"])
        if codec == "int8":
            assert p["bytes_in"] <= 0.35 * fp32 and p["bytes_out"] <= 0.35 * fp32  # tiny shapes: headers weigh
    if codec != "none":
        assert (f"/nowhere/{codec}/1", "law") in site._feedback or codec == "fp16"
    assert "law" in s.experts
