"""What both sides need: model loading and quantization, the LoRA delta type and its
wire codecs, the data format, the local training loop."""

import os

# OpenMP threads that spin while waiting make torch up to 25x slower whenever another
# busy process shares the cores (a site daemon beside its SuperNode, simulation actors,
# a laptop): measured 13.5 s vs 0.54 s per LoRA step on 2 shared cores. Passive waiting
# costs nothing when the cores are free. Set before torch loads OpenMP; a user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
