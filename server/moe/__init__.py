"""The served mixture-of-experts model: base + domain experts + a gate (gates/), and the
static merges it is compared with."""
