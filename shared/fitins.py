"""An adapter and an FFA-LoRA update in Flower's legacy FitIns / FitRes form: SecAgg+
(`SecAggPlusWorkflow` + `secaggplus_mod`) carries only legacy `Parameters` (a list of
arrays) and scalar configs, so tensor names travel comma-joined in the config and an
update travels as one array per module, modules sorted."""

from __future__ import annotations

import numpy as np
import torch
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays

from fedmoe.shared.delta import LoraDelta
from fedmoe.shared.errors import DeltaValidationError


def adapter_to_fitins(delta: LoraDelta, config: dict) -> FitIns:
    keys = sorted(delta.tensors)
    tensors = [delta.tensors[k].detach().float().cpu().numpy() for k in keys]
    meta = {"rank": int(delta.rank), "alpha": float(delta.alpha), "base-fingerprint": delta.base_fingerprint,
            "tensor-keys": ",".join(keys)}
    return FitIns(ndarrays_to_parameters(tensors), dict(config) | meta)


def adapter_from_fitins(fitins: FitIns) -> tuple[LoraDelta, dict]:
    """(the adapter, the rest of the config)."""
    cfg = dict(fitins.config)
    keys = str(cfg.pop("tensor-keys", "")).split(",")
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(arrays):
        raise DeltaValidationError(f"FitIns has {len(arrays)} tensors for {len(keys)} names")
    for key in ("rank", "alpha", "base-fingerprint"):
        if key not in cfg:
            raise DeltaValidationError(f"FitIns lacks {key!r}")
    tensors = {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in zip(keys, arrays)}
    return LoraDelta(tensors, int(cfg["rank"]), float(cfg["alpha"]), str(cfg["base-fingerprint"])), cfg


def update_to_parameters(update: dict[str, torch.Tensor]) -> Parameters:
    # float64: SecAgg+ quantizes (u + c) Q / 2c; in float32 adding c alone costs 3e-8 c.
    return ndarrays_to_parameters([update[m].double().numpy() for m in sorted(update)])


def update_from_arrays(arrays: list[np.ndarray], a0: LoraDelta, r_max: int) -> dict[str, torch.Tensor]:
    """{module: u} from one array per module (sorted), each checked against the expert's shape."""
    modules = a0.modules()
    if len(arrays) != len(modules):
        raise DeltaValidationError(f"{len(arrays)} arrays for {len(modules)} modules")
    out = {}
    for m, arr in zip(modules, arrays):
        want = (a0.factors(m)[1].shape[0], r_max)
        if tuple(arr.shape) != want:
            raise DeltaValidationError(f"module {m!r}: shape {list(arr.shape)}, expected {list(want)}")
        if not np.isfinite(arr).all():
            raise DeltaValidationError(f"module {m!r}: non-finite values")
        out[m] = torch.from_numpy(np.asarray(arr, dtype=np.float64))
    return out
