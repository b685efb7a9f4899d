"""Differential-privacy noise, drawn from the operating system's CSPRNG.

The guarantee of the Gaussian mechanism holds only if nobody can recompute the noise.
Everything else in fedmoe is seeded from the run seed (sampling, training, initial
adapters) so that runs repeat; the noise must not be: whoever knows the seed (it is in
run.json and the run store) could regenerate it and subtract it, recovering the
noiseless sum. So every draw seeds a fresh torch Generator with 64 bits from
`os.urandom`, never from the run seed or torch's global generator (which training seeds).
"""

from __future__ import annotations

import os

import torch


def private_generator() -> torch.Generator:
    """A torch Generator seeded with 64 fresh bits from the OS CSPRNG: unrelated to any
    run seed and to every other draw."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def gaussian_noise(shape, std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, std^2) of `shape`, from a private generator (one per call)."""
    return torch.randn(shape, generator=private_generator(), dtype=dtype) * std
