"""The federation's privacy modes, named the same on both sides: the coordinator declares
its mode in every TRAIN config (`privacy`), and a site's policy (`--min-privacy`) says
which modes it accepts.

What each mode protects, and so which satisfy a site's minimum:
- `none`: the site's update as trained, in plaintext to the coordinator.
- `ffa`: the same, with A frozen (FFA-LoRA): no protection by itself, but the basis of the
  two below; it satisfies only a minimum of `ffa` or `none`.
- `dp`: the site clips its update; the coordinator adds Gaussian noise to the mean (central
  DP: the released experts are (ε, δ)-DP, but the coordinator sees each clipped update).
- `secagg`: SecAgg+ masks the update, so the coordinator sees only the per-domain mean (no
  noise: the released experts carry no DP guarantee).
`dp` and `secagg` protect against different parties (everyone who sees the experts vs the
coordinator), so neither is stronger: a minimum of `dp` accepts only `dp`, of `secagg`
only `secagg`, and a site that takes either names both (`dp,secagg`).
"""

from __future__ import annotations

MODES = ("none", "ffa", "dp", "secagg")
AT_LEAST = {"none": MODES, "ffa": ("ffa", "dp", "secagg"), "dp": ("dp",), "secagg": ("secagg",)}
# Modes under which a site's replies carry no per-site loss or accuracy (what its data
# scores is not covered by the clip / noise / masks, so it is not sent).
METRICS_WITHHELD = ("dp", "secagg")
