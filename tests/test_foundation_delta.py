"""Foundation: the LoRA delta type, its three codecs, validation, and the generated
protobuf code."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmoe.shared.delta import A_SUFFIX, B_SUFFIX, AdapterSpec, LoraDelta
from fedmoe.shared.errors import DeltaValidationError, FedmoeError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir):
    from fedmoe.client.trainer import SiteTrainer

    return SiteTrainer(tiny_model_dir, quant="none", rank=4)


@pytest.fixture
def delta(trainer) -> LoraDelta:
    """The trainer's adapter with every factor random (a fresh adapter's B is zero)."""
    g = torch.Generator().manual_seed(0)
    fresh = trainer.current_delta()
    tensors = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in fresh.tensors.items()}
    return LoraDelta(tensors, fresh.rank, fresh.alpha, trainer.fingerprint)


def assert_same(a: LoraDelta, b: LoraDelta) -> None:
    assert (a.rank, a.alpha, a.base_fingerprint) == (b.rank, b.alpha, b.base_fingerprint)
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype, k
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert a.checksum() == b.checksum()


def test_delta_matches_the_model(trainer, delta):
    assert set(delta.modules()) == set(trainer.spec.modules)
    assert len(delta.tensors) == 2 * len(trainer.spec.modules)
    assert delta.rank == 4 and delta.alpha == 8.0 and delta.scaling == 2.0
    module = delta.modules()[0]
    a, b = delta.factors(module)
    fan_in, fan_out = trainer.spec.modules[module]
    assert a.shape == (4, fan_in) and b.shape == (fan_out, 4)
    assert delta.num_bytes() == sum(4 * (4 * i + 4 * o) for i, o in trainer.spec.modules.values())
    delta.validate(trainer.spec, trainer.fingerprint)


# -- codecs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_array_record_round_trip(delta, dtype):
    d = delta.to(dtype)
    arrays, config = d.to_records()
    back = LoraDelta.from_records(arrays, config)
    assert_same(d, back)
    assert back.meta["checksum"] == d.checksum()
    back.validate_checksum()


def test_array_record_survives_flower_transport(delta):
    """Deflated to bytes and inflated again, object by object, as Flower's transport
    moves a Message's records between SuperLink and SuperNode."""
    try:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
        from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
    except ImportError:  # internal module; its place may move between Flower releases
        pytest.skip("Flower's inflatable-object utilities moved")

    def transport(record):
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
        assert all(isinstance(c, bytes) for c in contents.values())
        return inflate_object_from_contents(record.object_id, contents)

    for dtype in (torch.float32, torch.float16):
        d = delta.to(dtype)
        arrays, config = d.to_records()
        back = LoraDelta.from_records(transport(arrays), transport(config))
        assert_same(d, back)
        back.validate_checksum()


def test_from_records_needs_metadata(delta):
    from flwr.app import ConfigRecord

    arrays, config = delta.to_records()
    with pytest.raises(DeltaValidationError, match="lacks 'base-fingerprint'"):
        LoraDelta.from_records(arrays, ConfigRecord({"rank": 4, "alpha": 8.0}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_safetensors_round_trip(delta, dtype, tmp_path):
    d = delta.to(dtype)
    path = tmp_path / "delta.safetensors"
    d.save(path)
    assert not list(tmp_path.glob("*.tmp"))
    back = LoraDelta.load(path)
    assert_same(d, back)
    from safetensors.torch import load_file  # a stock reader sees peft's keys

    assert set(load_file(str(path))) == set(d.tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_protobuf_round_trip(delta, dtype):
    from fedmoe.protos import lora_delta_pb2 as pb

    d = delta.to(dtype)
    wire = d.to_proto().SerializeToString()
    back = LoraDelta.from_proto(pb.LoraDelta.FromString(wire))
    assert_same(d, back)
    assert back.meta["checksum"] == d.checksum()


def test_alpha_survives_every_codec_exactly(delta, tmp_path):
    d = LoraDelta(delta.tensors, delta.rank, 16.0, delta.base_fingerprint)
    d.save(tmp_path / "d.safetensors")
    assert LoraDelta.load(tmp_path / "d.safetensors").alpha == 16.0
    assert LoraDelta.from_records(*d.to_records()).alpha == 16.0
    assert LoraDelta.from_proto(d.to_proto()).alpha == 16.0


def test_apply_to_sets_the_model_factors(trainer, delta):
    trainer.set_adapter(delta)
    assert_same(delta, trainer.current_delta())
    trainer.set_adapter(None)
    assert trainer.current_delta().update_norm() == 0.0  # back to the fresh adapter (B = 0)


# -- validation --------------------------------------------------------------------------------


def first_key(delta: LoraDelta, suffix: str = A_SUFFIX) -> str:
    return next(k for k in sorted(delta.tensors) if k.endswith(suffix))


def rejected(delta: LoraDelta, spec: AdapterSpec, fingerprint: str | None = None, **kw) -> str:
    with pytest.raises(DeltaValidationError) as exc:
        delta.validate(spec, fingerprint, where="site-3", **kw)
    msg = str(exc.value)
    assert msg.startswith("site-3: ") and "\n" not in msg
    return msg


def test_unknown_module(trainer, delta):
    key = first_key(delta)
    delta.tensors["base_model.model.model.layers.0.self_attn.x_proj" + A_SUFFIX] = delta.tensors[key].clone()
    assert "unknown module" in rejected(delta, trainer.spec)


def test_not_a_lora_key(trainer, delta):
    delta.tensors["model.embed_tokens.weight"] = torch.zeros(2, 2)
    assert "not a LoRA factor" in rejected(delta, trainer.spec)


@pytest.mark.parametrize("which", [A_SUFFIX, B_SUFFIX])
def test_wrong_shape(trainer, delta, which):
    key = first_key(delta, which)
    t = delta.tensors[key]
    delta.tensors[key] = torch.zeros(t.shape[0] + 1, t.shape[1]) if which == A_SUFFIX else torch.zeros(t.shape[0], t.shape[1] + 1)
    msg = rejected(delta, trainer.spec)
    assert "shape" in msg and key in msg


def test_rank_in_metadata_must_match_the_tensors(trainer, delta):
    delta.rank = 8
    assert "shape" in rejected(delta, trainer.spec)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int8])
def test_wrong_dtype(trainer, delta, dtype):
    key = first_key(delta)
    delta.tensors[key] = delta.tensors[key].to(dtype)
    msg = rejected(delta, trainer.spec)
    assert "dtype" in msg and str(dtype).removeprefix("torch.") in msg


def test_bfloat16_delta_is_rejected_after_every_codec(trainer, delta, tmp_path):
    bf = delta.to(torch.bfloat16)
    bf.checksum()  # hashing must not need numpy's dtypes
    bf.save(tmp_path / "bf.safetensors")
    assert "dtype bfloat16" in rejected(LoraDelta.load(tmp_path / "bf.safetensors"), trainer.spec)
    with pytest.raises(DeltaValidationError, match="unsupported dtype 'bfloat16'"):
        LoraDelta.from_proto(bf.to_proto())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(trainer, delta, bad):
    key = first_key(delta, B_SUFFIX)
    delta.tensors[key][0, 0] = bad
    msg = rejected(delta, trainer.spec)
    assert "non-finite" in msg and key in msg


def test_fingerprint_mismatch(trainer, delta):
    assert "made for base model" in rejected(delta, trainer.spec, "sha256:" + "0" * 32)
    delta.validate(trainer.spec, None)  # a receiver that does not check fingerprints


@pytest.mark.parametrize("which", [A_SUFFIX, B_SUFFIX])
def test_missing_factor(trainer, delta, which):
    key = first_key(delta, which)
    del delta.tensors[key]
    other = "lora_A" if which == A_SUFFIX else "lora_B"
    msg = rejected(delta, trainer.spec)
    assert f"lacks its {other} factor" in msg


def test_empty_and_bad_scalars(trainer, delta):
    assert "no LoRA tensors" in rejected(LoraDelta({}, 4, 8.0, "fp"), trainer.spec)
    for rank, alpha, needle in [(0, 8.0, "rank"), (4, 0.0, "alpha"), (4, float("nan"), "alpha")]:
        assert needle in rejected(LoraDelta(dict(delta.tensors), rank, alpha, "fp"), trainer.spec)


def test_norm_bound(trainer, delta):
    norm = delta.update_norm()
    delta.validate(trainer.spec, max_norm=norm * 1.01)
    assert "exceeds bound" in rejected(delta, trainer.spec, max_norm=norm * 0.99)


def tamper(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def test_checksum_catches_a_flipped_byte_on_disk(delta, tmp_path):
    path = tmp_path / "d.safetensors"
    delta.save(path)
    raw = path.read_bytes()
    path.write_bytes(tamper(raw, len(raw) - 3))  # inside the last tensor's data
    with pytest.raises(DeltaValidationError, match="checksum mismatch"):
        LoraDelta.load(path)


def test_checksum_catches_a_flipped_byte_on_the_wire(trainer, delta):
    msg = delta.to_proto()
    msg.tensors[1].data = tamper(msg.tensors[1].data, 5)
    back = LoraDelta.from_proto(msg)
    assert "checksum mismatch" in rejected(back, trainer.spec)


def test_checksum_catches_a_changed_array_record(trainer, delta):
    from flwr.app import ArrayRecord

    arrays, config = delta.to_records()
    state = arrays.to_torch_state_dict()
    key = first_key(delta)
    state[key] = state[key].clone()
    state[key][0, 0] += 1e-3
    back = LoraDelta.from_records(ArrayRecord(state), config)
    assert "checksum mismatch" in rejected(back, trainer.spec)


def test_unreadable_or_incomplete_files(delta, tmp_path):
    with pytest.raises(FedmoeError, match="delta file not found"):
        LoraDelta.load(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(DeltaValidationError, match="unreadable safetensors"):
        LoraDelta.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file(dict(delta.tensors), str(tmp_path / "nometa.safetensors"))
    with pytest.raises(DeltaValidationError, match="metadata lacks 'rank'"):
        LoraDelta.load(tmp_path / "nometa.safetensors")


def test_malformed_protobuf_tensors(delta):
    msg = delta.to_proto()
    msg.tensors[0].data = msg.tensors[0].data[:-1]
    with pytest.raises(DeltaValidationError, match="bytes do not fill shape"):
        LoraDelta.from_proto(msg)
    msg = delta.to_proto()
    msg.tensors[0].shape[0] += 1
    with pytest.raises(DeltaValidationError, match="do not fill shape"):
        LoraDelta.from_proto(msg)
    msg = delta.to_proto()
    msg.tensors[0].dtype = "float64"
    with pytest.raises(DeltaValidationError, match="unsupported dtype 'float64'"):
        LoraDelta.from_proto(msg)


# -- the update norm ------------------------------------------------------------------------------


def test_update_norm_equals_the_dense_computation(delta):
    dense = 0.0
    for m in delta.modules():
        a, b = (t.double() for t in delta.factors(m))
        dense += float(torch.linalg.matrix_norm(delta.scaling * (b @ a), "fro")) ** 2
    assert delta.update_norm() == pytest.approx(math.sqrt(dense), rel=1e-9)
    assert delta.update_norm() > 0
    # scaling enters linearly: doubling alpha doubles the norm
    doubled = LoraDelta(delta.tensors, delta.rank, 2 * delta.alpha, delta.base_fingerprint)
    assert doubled.update_norm() == pytest.approx(2 * delta.update_norm(), rel=1e-9)


def test_update_norm_of_a_single_module_by_hand():
    a = torch.tensor([[1.0, 0.0, 2.0]])  # r=1, in=3
    b = torch.tensor([[3.0], [4.0]])  # out=2
    d = LoraDelta({"m" + A_SUFFIX: a, "m" + B_SUFFIX: b}, rank=1, alpha=2.0, base_fingerprint="fp")
    # ||2 * B A||_F = 2 * ||B|| * ||A|| = 2 * 5 * sqrt(5)
    assert d.update_norm() == pytest.approx(2 * 5 * math.sqrt(5))


# -- generated protobuf code ----------------------------------------------------------------------


def test_generated_protobuf_code_is_current():
    pytest.importorskip("grpc_tools")
    proc = subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout


def test_protobuf_check_notices_an_edited_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    protos = tmp_path / "protos"
    shutil.copytree(REPO / "protos", protos, ignore=shutil.ignore_patterns("__pycache__"))
    check = [sys.executable, str(protos / "generate.py"), "--check"]
    assert subprocess.run(check, capture_output=True, text=True, timeout=120).returncode == 0  # a faithful copy is current
    proto = protos / "lora_delta.proto"
    proto.write_text(proto.read_text().replace("string checksum = 5;", "string checksum = 5;\n  uint32 round = 6;"))
    proc = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "stale" in proc.stdout and "lora_delta_pb2.py" in proc.stdout
