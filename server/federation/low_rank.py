"""A low-rank update in factored form, the currency of the aggregators."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """ΔW = B @ A for one module (no scaling folded elsewhere)."""

    b: torch.Tensor  # [out, r]
    a: torch.Tensor  # [r, in]
