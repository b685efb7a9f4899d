"""`LoraDelta`: one LoRA adapter update, and its codecs.

A delta holds the factors of every adapted module under peft's state-dict keys
(`<module>.lora_A.weight` of shape [r, in], `<module>.lora_B.weight` of shape [out, r]),
the rank, alpha (the weight update is alpha/r * B @ A) and the fingerprint of the base
model it belongs to. It converts to and from a Flower ArrayRecord (+ ConfigRecord
metadata), a safetensors file and the `fedmoe.v1.LoraDelta` protobuf message, and
`validate` checks one against what the receiver's model expects.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedmoe.shared.errors import DeltaValidationError, FedmoeError

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class AdapterSpec:
    """What a receiver accepts: module name -> (in_features, out_features)."""

    modules: dict[str, tuple[int, int]]

    @classmethod
    def from_peft_model(cls, model) -> "AdapterSpec":
        from peft.tuners.lora import LoraLayer

        modules = {}
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                modules[name] = (int(module.in_features), int(module.out_features))
        if not modules:
            raise FedmoeError("model has no LoRA layers")
        return cls(modules)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian C-order bytes of any dtype (numpy has no bfloat16)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def module_of(key: str) -> tuple[str, str]:
    for suffix, which in ((A_SUFFIX, "A"), (B_SUFFIX, "B")):
        if key.endswith(suffix):
            return key[: -len(suffix)], which
    raise DeltaValidationError(f"tensor {key!r} is not a LoRA factor (expected *{A_SUFFIX} or *{B_SUFFIX})")


@dataclass
class LoraDelta:
    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    base_fingerprint: str
    meta: dict = field(default_factory=dict)

    # -- structure -------------------------------------------------------------
    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def modules(self) -> list[str]:
        return sorted({module_of(k)[0] for k in self.tensors})

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[module + A_SUFFIX], self.tensors[module + B_SUFFIX]

    @classmethod
    def from_factors(cls, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float, base_fingerprint: str) -> "LoraDelta":
        tensors = {}
        for module, (a, b) in factors.items():
            tensors[module + A_SUFFIX] = a.contiguous()
            tensors[module + B_SUFFIX] = b.contiguous()
        return cls(tensors, rank, alpha, base_fingerprint)

    def padded_to(self, rank: int) -> "LoraDelta":
        """The same update at a larger rank: A gains zero rows, B zero columns, and alpha
        grows with the rank so that alpha/r (and so every module's ΔW) is unchanged."""
        if rank < self.rank:
            raise FedmoeError(f"cannot pad a rank-{self.rank} delta down to rank {rank}")
        if rank == self.rank:
            return self
        factors = {}
        for m in self.modules():
            a, b = self.factors(m)
            factors[m] = (torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], 0),
                          torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1))
        return LoraDelta.from_factors(factors, rank, self.scaling * rank, self.base_fingerprint)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def update_norm(self) -> float:
        """Frobenius norm of the full weight update sum over modules, without forming B @ A:
        ||s B A||^2 = s^2 trace((B^T B)(A A^T))."""
        total = 0.0
        for m in self.modules():
            a, b = (t.double() for t in self.factors(m))
            total += float(torch.trace((b.T @ b) @ (a @ a.T))) * self.scaling**2
        return math.sqrt(max(total, 0.0))

    def to(self, dtype: torch.dtype) -> "LoraDelta":
        return LoraDelta({k: v.to(dtype) for k, v in self.tensors.items()}, self.rank, self.alpha, self.base_fingerprint, dict(self.meta))

    def checksum(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            t = self.tensors[name].detach().cpu().contiguous()
            h.update(name.encode())
            h.update(str(t.dtype).removeprefix("torch.").encode())
            h.update(repr(tuple(t.shape)).encode())
            h.update(tensor_bytes(t))
        return h.hexdigest()

    # -- peft ------------------------------------------------------------------
    @classmethod
    def from_peft_model(cls, model, base_fingerprint: str, adapter_name: str = "default") -> "LoraDelta":
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        cfg = model.peft_config[adapter_name]
        tensors = {k: v.detach().float().cpu().clone() for k, v in state.items() if k.endswith((A_SUFFIX, B_SUFFIX))}
        return cls(tensors, int(cfg.r), float(cfg.lora_alpha), base_fingerprint)

    def apply_to(self, model, adapter_name: str = "default") -> None:
        """Load these factors into the model's adapter (shapes must already match)."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, {k: v.float() for k, v in self.tensors.items()}, adapter_name=adapter_name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise DeltaValidationError(f"delta has tensors the model does not: {unexpected[0]}")

    # -- Flower ----------------------------------------------------------------
    def to_records(self):
        """(ArrayRecord, ConfigRecord) for a Flower Message (float16/float32 only)."""
        from flwr.app import ArrayRecord, ConfigRecord

        arrays = ArrayRecord({k: v.detach().cpu() for k, v in self.tensors.items()})
        config = ConfigRecord({"rank": int(self.rank), "alpha": float(self.alpha), "base-fingerprint": self.base_fingerprint, "checksum": self.checksum()})
        return arrays, config

    @classmethod
    def from_records(cls, arrays, config) -> "LoraDelta":
        for key in ("rank", "alpha", "base-fingerprint"):
            if key not in config:
                raise DeltaValidationError(f"delta metadata lacks {key!r}")
        tensors = {k: v for k, v in arrays.to_torch_state_dict().items()}
        delta = cls(tensors, int(config["rank"]), float(config["alpha"]), str(config["base-fingerprint"]))
        if "checksum" in config:
            delta.meta["checksum"] = str(config["checksum"])
        return delta

    # -- safetensors -----------------------------------------------------------
    def save(self, path: str | Path, before_rename=None) -> None:
        """Write a safetensors file atomically (write, then rename). `before_rename()`, if
        given, runs between the two (a fault-injection point of the run store)."""
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        meta = {"rank": str(self.rank), "alpha": repr(self.alpha), "base_fingerprint": self.base_fingerprint, "checksum": self.checksum()}
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp), metadata=meta)
        if before_rename is not None:
            before_rename()
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "LoraDelta":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FedmoeError(f"delta file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise DeltaValidationError(f"{path}: unreadable safetensors file ({str(exc).splitlines()[0]})") from None
        try:
            delta = cls(tensors, int(meta["rank"]), float(meta["alpha"]), meta["base_fingerprint"])
        except KeyError as exc:
            raise DeltaValidationError(f"{path}: safetensors metadata lacks {exc.args[0]!r}") from None
        if "checksum" in meta:
            delta.meta["checksum"] = meta["checksum"]
        delta.validate_checksum(where=str(path))
        return delta

    # -- protobuf --------------------------------------------------------------
    def to_proto(self):
        from fedmoe.protos import lora_delta_pb2 as pb

        msg = pb.LoraDelta(rank=self.rank, alpha=self.alpha, base_fingerprint=self.base_fingerprint, checksum=self.checksum())
        for name in sorted(self.tensors):
            t = self.tensors[name].detach().cpu().contiguous()
            msg.tensors.add(name=name, dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), data=tensor_bytes(t))
        return msg

    @classmethod
    def from_proto(cls, msg) -> "LoraDelta":
        np_dtypes = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
        tensors = {}
        for t in msg.tensors:
            if t.dtype not in np_dtypes:
                raise DeltaValidationError(f"tensor {t.name!r}: unsupported dtype {t.dtype!r}")
            itemsize = np.dtype(np_dtypes[t.dtype]).itemsize
            if len(t.data) != itemsize * math.prod(t.shape):
                raise DeltaValidationError(f"tensor {t.name!r}: {len(t.data)} bytes do not fill shape {list(t.shape)} of {t.dtype}")
            arr = np.frombuffer(t.data, dtype=np_dtypes[t.dtype])
            tensors[t.name] = torch.from_numpy(arr.reshape(tuple(t.shape)).copy())
        delta = cls(tensors, int(msg.rank), float(msg.alpha), msg.base_fingerprint)
        if msg.checksum:
            delta.meta["checksum"] = msg.checksum
        return delta

    # -- validation ------------------------------------------------------------
    def validate_checksum(self, where: str = "delta") -> None:
        expected = self.meta.get("checksum")
        if expected and expected != self.checksum():
            raise DeltaValidationError(f"{where}: checksum mismatch (data changed in transit or on disk)")

    def validate(self, spec: AdapterSpec, base_fingerprint: str | None = None, max_norm: float | None = None, where: str = "delta") -> None:
        """Raise DeltaValidationError (one line) unless this delta is safe to aggregate."""
        if base_fingerprint is not None and self.base_fingerprint != base_fingerprint:
            raise DeltaValidationError(f"{where}: made for base model {self.base_fingerprint}, expected {base_fingerprint}")
        if self.rank < 1:
            raise DeltaValidationError(f"{where}: rank must be >= 1, got {self.rank}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise DeltaValidationError(f"{where}: alpha must be a positive number, got {self.alpha}")
        self.validate_checksum(where)
        seen: dict[str, set] = {}
        for key, t in self.tensors.items():
            try:
                module, which = module_of(key)
            except DeltaValidationError as exc:
                raise DeltaValidationError(f"{where}: {exc}") from None
            if module not in spec.modules:
                raise DeltaValidationError(f"{where}: unknown module {module!r}")
            if t.dtype not in WIRE_DTYPES.values():
                raise DeltaValidationError(f"{where}: tensor {key!r} has dtype {str(t.dtype).removeprefix('torch.')}, expected float32 or float16")
            fan_in, fan_out = spec.modules[module]
            want = (self.rank, fan_in) if which == "A" else (fan_out, self.rank)
            if tuple(t.shape) != want:
                raise DeltaValidationError(f"{where}: tensor {key!r} has shape {list(t.shape)}, expected {list(want)}")
            if not torch.isfinite(t).all():
                raise DeltaValidationError(f"{where}: tensor {key!r} has non-finite values")
            seen.setdefault(module, set()).add(which)
        for module, which in seen.items():
            if which != {"A", "B"}:
                raise DeltaValidationError(f"{where}: module {module!r} lacks its lora_{'B' if 'A' in which else 'A'} factor")
        if not seen:
            raise DeltaValidationError(f"{where}: no LoRA tensors")
        # A missing module would aggregate as "no change" with the site's full weight
        # elsewhere: a reply is exactly the receiver's module set, or it is refused.
        if missing := sorted(set(spec.modules) - set(seen)):
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DeltaValidationError(f"{where}: module {missing[0]!r}{more} missing (expected {len(spec.modules)} modules, "
                                       f"got {len(seen)})")
        if max_norm is not None:
            norm = self.update_norm()
            if norm > max_norm:
                raise DeltaValidationError(f"{where}: update norm {norm:.3g} exceeds bound {max_norm:.3g}")


def b_update(trained: LoraDelta, sent: LoraDelta, r_max: int) -> dict[str, torch.Tensor]:
    """FFA-LoRA update u = s (B_k - B_0) per module, zero-padded to r_max columns, against
    the frozen A both share; rejects a changed A. Linear in B, so Σ p_k u_k is the exact aggregate."""
    out = {}
    for m in trained.modules():
        at, bt = trained.factors(m)
        a0, b0 = sent.factors(m)
        if not torch.equal(at.float(), a0.float()):
            raise DeltaValidationError(f"module {m!r}: lora_A changed, but this privacy mode trains with A frozen")
        u = bt.double() * trained.scaling - b0.double() * sent.scaling
        out[m] = torch.nn.functional.pad(u, (0, r_max - u.shape[1]))
    return out
