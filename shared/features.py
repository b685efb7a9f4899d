"""Prompt features for routing: a kernel mean embedding of base-model hidden states.

Both sides compute them: a site for its prototype message and its local router steps,
the coordinator for every request it routes. A prompt's feature is the mean, over its
tokens, of random Fourier features (Rahimi & Recht) of the unit-normalized hidden states
at one layer of the *base* model (adapters off). Comparing two such means is comparing
the two token distributions under an RBF kernel (an MMD), so a domain's mean is a
prototype of the domain's token distribution, and a request is near the prototype of
the domain whose vocabulary it uses.

Why not a plain mean of hidden states: a plain mean is dominated by the template
words every domain shares, and on the suite it routes barely better than chance; the
kernel mean keeps the few domain words (roles, places, documents) apart from the rest.
Layer 0 (the input embeddings) routes best on the default model and costs no
transformer block at all, which keeps gated inference about as fast as one LoRA;
`layer=L` stops the forward after block L instead.

The random projection is fixed by (seed, dim, bandwidth, hidden size), so the
coordinator and every site compute the same features from the config alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from fedmoe.shared.errors import FedmoeError


@dataclass(frozen=True)
class FeatureConfig:
    layer: int = 0          # 0 = input embeddings, L = output of decoder block L
    dim: int = 2048         # number of random Fourier features
    bandwidth: float = 0.5  # RBF bandwidth on the unit sphere
    seed: int = 0
    max_length: int = 128   # prompt tokens kept (the tail, like training)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class _StopForward(Exception):
    pass


def decoder_layers(model):
    """The model's list of decoder blocks (any HF causal LM: the longest ModuleList
    whose length is config.num_hidden_layers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = getattr(base.config, "num_hidden_layers", None)
    best = None
    for _, module in base.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise FedmoeError(f"cannot find the decoder blocks of model type {getattr(base.config, 'model_type', '?')!r}")
    return best


@torch.no_grad()
def layer_inputs(model, layers, input_ids: torch.Tensor, attention_mask: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """The input of each of `layers` (modules inside the first `blocks` decoder blocks)
    during one base-model forward of the prompts: what the zero-shot gates route on."""
    captured: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0]))
               for i, m in enumerate(layers)]
    try:
        hidden_states_at(model, input_ids, attention_mask, blocks)  # base forward through those blocks
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in range(len(layers))]


@torch.no_grad()
def layer_token_mean(served, layers, prompts: list[str], blocks: int, score) -> torch.Tensor:
    """The zero-shot gates' routing score: `score(i, x)` gives [n, t, K] expert scores from
    layer i's input x [n, t, in] (one base forward of the prompts through the first `blocks`
    blocks); averaged over each prompt's real tokens, then over the layers: [n, K]."""
    ids, mask = served.featurizer.tokenize(prompts)
    ids, mask = ids.to(served.device), mask.to(served.device)
    captured = layer_inputs(served.model, layers, ids, mask, blocks)
    m = mask.unsqueeze(-1).float()  # [n, t, 1]
    total = 0.0
    for i, x in enumerate(captured):
        total = total + (score(i, x.float()) * m).sum(1) / m.sum(1).clamp(min=1)
    return total / len(layers)


def hidden_states_at(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """Base-model hidden states [n, t, h] after `layer` blocks (0 = embeddings), running
    only as much of the forward as needed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if layer == 0:
        return base.get_input_embeddings()(input_ids).float()
    blocks = decoder_layers(model)
    if not 0 <= layer <= len(blocks):
        raise FedmoeError(f"feature layer {layer} out of range: the model has {len(blocks)} decoder blocks")
    captured = {}

    def grab(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    handle = blocks[layer - 1].register_forward_hook(grab)
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else _nullcontext()
    try:
        with ctx:
            model(input_ids=input_ids, attention_mask=attention_mask)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"].float()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class PromptFeaturizer:
    """Callable: list of prompts -> float32 features [n, cfg.dim] (on CPU)."""

    def __init__(self, model, tokenizer, cfg: FeatureConfig | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg or FeatureConfig()
        hidden = model.get_input_embeddings().weight.shape[1]
        gen = torch.Generator().manual_seed(self.cfg.seed)
        # RBF kernel exp(-|x-y|^2 / (2 bw^2)) <=> frequencies ~ N(0, 1/bw^2)
        self.freqs = torch.randn(hidden, self.cfg.dim, generator=gen) / self.cfg.bandwidth
        self.phases = torch.rand(self.cfg.dim, generator=gen) * 2 * math.pi
        self._device_cache: dict = {}

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"][-self.cfg.max_length:] for p in prompts]
        width = max(1, max(len(x) for x in ids))
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return input_ids, mask

    @torch.no_grad()
    def __call__(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        if not prompts:
            return torch.zeros(0, self.cfg.dim)
        device = next(self.model.parameters()).device
        if device not in self._device_cache:
            self._device_cache = {device: (self.freqs.to(device), self.phases.to(device))}
        freqs, phases = self._device_cache[device]
        out = []
        for i in range(0, len(prompts), batch_size):
            ids, mask = self.tokenize(prompts[i : i + batch_size])
            ids, mask = ids.to(device), mask.to(device)
            h = torch.nn.functional.normalize(hidden_states_at(self.model, ids, mask, self.cfg.layer), dim=-1)
            phi = torch.cos(h @ freqs + phases) * math.sqrt(2.0 / self.cfg.dim)
            m = mask.unsqueeze(-1).float()
            out.append(((phi * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu())
        return torch.cat(out)


def record_prompt(record) -> str:
    """What routing sees of a record: its prompt (a text record: its text)."""
    return record.completion if record.is_text else record.prompt


class LinearRouter(torch.nn.Module):
    """logits = W (sqrt(d) (x - center)) + b; sqrt(d) undoes the features' 1/sqrt(d) scale.
    `center` (a buffer, not trained; zeros unless set) removes what all prompts share (the
    templates), so every step of W is spent on what tells domains apart: with it, a site's
    clipped update is not mostly a common component that cancels in the federation's mean."""

    TRAINED = ("proj.weight", "proj.bias")  # the keys sites train (and DP noise touches)

    def __init__(self, dim: int, experts: int, center: torch.Tensor | None = None):
        super().__init__()
        self.dim = dim
        self.proj = torch.nn.Linear(dim, experts)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)
        self.register_buffer("center", torch.zeros(dim) if center is None else center.detach().float().reshape(dim).clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj((features - self.center) * math.sqrt(self.dim))
