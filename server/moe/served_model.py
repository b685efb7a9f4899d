"""`ServedModel`: the coordinator's full-precision base + K domain experts + gates.

The experts are named peft adapters on one `PeftModel` (named after their domains).
A gate maps prompts to a distribution over the experts; the served model keeps its
top-k and runs:

- top-1 through peft's mixed-batch inference (`adapter_names`): one forward serves a
  batch whose sequences go to different experts, with no weight merging (a generation
  batch that routes to one expert only runs that adapter as the active one, which
  skips the per-layer sub-batch indexing: same output, less overhead);
- top-k > 1 by mixing the selected experts' LoRA outputs per sequence,
  y = W x + sum_e w_e s_e B_e A_e x, with forward hooks on the LoRA layers while
  peft's own adapters are switched off.

`lm` is the module to hand to `fedmoe.shared.training.evaluate` together with
`forward_kwargs_fn(gate)`.

Hot swap (a live run's newer round): `prepare_swap` builds the new LoRA factors of every
expert off the decoding thread (padded to the served rank, rescaled to the served
alpha/r), `stage_swap` hands them over, and they are copied into the existing peft
adapters in place, under the model lock, only while nobody holds the model (`hold` /
`release`, `pinned`): a decoder holds it from the first request of a batch until the
batch is empty, so a request never sees two rounds, and the gates that read the
experts' weights (`refresh()`: arrow, smile) are rebuilt in the same critical section.
`round` is the round whose weights are in the model (None: not from a run's rounds).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.features import FeatureConfig, PromptFeaturizer, record_prompt
from fedmoe.shared.modeling import load_adapter, load_base_model, load_tokenizer, model_fingerprint, pick_device

BASE = "__base__"  # peft's name for "no adapter" in adapter_names


def top_k_weights(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest weights, renormalized to sum to one."""
    k = max(1, min(int(k), probs.shape[1]))
    vals, idx = probs.topk(k, dim=1)
    out = torch.zeros_like(probs)
    out.scatter_(1, idx, vals)
    return out / out.sum(1, keepdim=True).clamp(min=1e-12)


@dataclass
class ExpertSwap:
    """A round's expert factors, ready to copy into the served adapters in place."""

    round: int
    experts: list[str]
    copies: list[tuple[torch.nn.Parameter, torch.Tensor]]


class ServedModel:
    def __init__(self, model_dir: str | Path, experts: dict[str, str | Path], device: str | None = None,
                 feature_config: FeatureConfig | None = None):
        if not experts:
            raise FedmoeError("no experts to serve")
        for name in experts:
            if not name or name.startswith("__") or name in ("arrow_router",) or "." in name:
                raise FedmoeError(f"invalid expert name {name!r}")
        self.model_dir = Path(model_dir)
        self.device = pick_device(device)
        self.fingerprint = model_fingerprint(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        model = load_base_model(self.model_dir, "none", str(self.device))
        self.experts = list(experts)
        self.expert_dirs = {k: Path(v) for k, v in experts.items()}
        for name, path in self.expert_dirs.items():
            model = load_adapter(model, path, self.fingerprint, adapter_name=name)
        model.eval()
        self.model = model
        self.featurizer = PromptFeaturizer(model, self.tokenizer, feature_config)
        self.gates: dict[str, object] = {}
        self.lm = MixedExpertsLM(self)
        self.max_positions = int(getattr(model.get_base_model().config, "max_position_embeddings", 0) or 0)
        self._lock = threading.RLock()  # one forward at a time: peft adapter state is shared
        self.round: int | None = None  # the run round whose expert weights are loaded
        self.swaps = 0
        self.swapped_at: float | None = None
        self.watch: dict = {}  # the round watcher's view (serving/hot_swap.py), for status pages
        self._holders = 0  # decoders whose state (KV caches, routing) was built on these weights
        self._pending: ExpertSwap | None = None

    # -- gates -----------------------------------------------------------------
    def add_gate(self, name: str, gate) -> None:
        if list(gate.experts) != self.experts:
            raise FedmoeError(f"gate {name!r} routes over {list(gate.experts)}, but this model serves {self.experts}")
        self.gates[name] = gate

    def gate(self, name: str):
        if name not in self.gates:
            raise FedmoeError(f"unknown gate {name!r}: this model has {', '.join(self.gates) or 'no gates'}")
        return self.gates[name]

    @torch.no_grad()
    def route(self, prompts: list[str], gate: str, top_k: int | None = None) -> torch.Tensor:
        """Expert weights [n, K] (rows sum to one); `top_k` keeps only the k largest."""
        with self._lock:
            probs = self.gate(gate).route(list(prompts)).float().cpu()
        if probs.shape != (len(prompts), len(self.experts)):
            raise FedmoeError(f"gate {gate!r} returned shape {list(probs.shape)}, expected [{len(prompts)}, {len(self.experts)}]")
        return top_k_weights(probs, top_k) if top_k else probs

    def adapter_names(self, weights: torch.Tensor) -> list[str]:
        return [self.experts[i] for i in weights.argmax(1).tolist()]

    def forward_kwargs_fn(self, gate: str, top_k: int = 1):
        """For `evaluate(served.lm, ..., forward_kwargs_fn=...)`: routes each batch on the
        records' prompts only (never on the answer)."""
        def fn(records):
            w = self.route([record_prompt(r) for r in records], gate, top_k)
            if top_k == 1:
                return {"adapter_names": self.adapter_names(w)}
            return {"expert_weights": w}
        return fn

    def expert_kwargs_fn(self, name: str):
        """Forward kwargs that send every sequence to one named adapter (an expert, a
        static merge, or `__base__`)."""
        return lambda records: {"adapter_names": [name] * len(records)}

    # -- hot swap --------------------------------------------------------------
    def prepare_swap(self, rnd: int, deltas: dict) -> ExpertSwap:
        """New factors for the named experts (LoraDelta each), as tensors shaped, typed and
        placed like the served adapters' (a smaller rank is zero-padded, B is rescaled to
        the served alpha/r: the same ΔW). Reads only shapes and configs: safe to run while
        the model decodes. FedmoeError if an expert does not fit the served adapter (other
        modules, a larger rank, another base): that needs a restart."""
        from peft.tuners.lora import LoraLayer

        layers = {name: m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)}
        copies = []
        for expert, delta in deltas.items():
            if expert not in self.experts:
                raise FedmoeError(f"round {rnd}: expert {expert!r} is not served (restart fedmoe serve to add it)")
            if delta.base_fingerprint != self.fingerprint:
                raise FedmoeError(f"round {rnd}: expert {expert!r} was made for base model {delta.base_fingerprint}, "
                                  f"but this base is {self.fingerprint}")
            served = sorted(n for n, m in layers.items() if expert in m.lora_A)
            if delta.modules() != served:
                raise FedmoeError(f"round {rnd}: expert {expert!r} adapts {len(delta.modules())} modules, the served one "
                                  f"{len(served)} (other modules): restart fedmoe serve to serve it")
            for name in served:
                layer, (a, b) = layers[name], delta.factors(name)
                pa, pb = layer.lora_A[expert].weight, layer.lora_B[expert].weight
                if a.shape[0] > pa.shape[0] or a.shape[1] != pa.shape[1] or b.shape[0] != pb.shape[0]:
                    raise FedmoeError(f"round {rnd}: expert {expert!r} module {name}: factors {list(a.shape)}/{list(b.shape)} "
                                      f"do not fit the served rank-{pa.shape[0]} adapter: restart fedmoe serve to serve it")
                r = a.shape[0]
                new_a = torch.zeros(pa.shape, dtype=pa.dtype, device=pa.device)
                new_b = torch.zeros(pb.shape, dtype=pb.dtype, device=pb.device)
                new_a[:r] = a.to(pa.device, pa.dtype)
                new_b[:, :r] = (b.double() * (delta.scaling / float(layer.scaling[expert]))).to(pb.device, pb.dtype)
                copies += [(pa, new_a), (pb, new_b)]
        return ExpertSwap(int(rnd), list(deltas), copies)

    def stage_swap(self, swap: ExpertSwap) -> bool:
        """Hand over a prepared swap (a newer one replaces one still waiting). It is applied
        now if no decoder holds the model, else when the last one releases it. Returns
        whether it was applied now."""
        with self._lock:
            self._pending = swap
            if self._holders == 0:
                self._apply_pending()
                return True
            return False

    @property
    def swap_pending(self) -> bool:
        return self._pending is not None

    def hold(self) -> int | None:
        """A decoder starts a batch: no swap until it `release`s; a waiting swap is applied
        first. Returns the round it will decode with."""
        with self._lock:
            if self._holders == 0:
                self._apply_pending()
            self._holders += 1
            return self.round

    def release(self) -> None:
        with self._lock:
            self._holders = max(0, self._holders - 1)
            if self._holders == 0:
                self._apply_pending()

    @contextlib.contextmanager
    def pinned(self):
        """`with served.pinned() as rnd:` one batch on one round's weights."""
        rnd = self.hold()
        try:
            yield rnd
        finally:
            self.release()

    def _apply_pending(self) -> None:  # under self._lock, with no holder
        swap, self._pending = self._pending, None
        if swap is None:
            return
        with torch.no_grad():
            for param, value in swap.copies:
                param.copy_(value)
        for gate in self.gates.values():  # gates computed from the experts' weights follow them
            refresh = getattr(gate, "refresh", None)
            if refresh is not None:
                refresh()
        self.round, self.swaps, self.swapped_at = swap.round, self.swaps + 1, time.time()

    def swap_status(self) -> dict:
        """What `/v1/models` and the stats say about the served round."""
        with self._lock:
            pending = self._pending.round if self._pending is not None else None
        return {"round": self.round, "swaps": self.swaps, "swapped_at": self.swapped_at, "pending_round": pending,
                "gates_refreshed": sorted(n for n, g in self.gates.items() if hasattr(g, "refresh")),
                "gates_kept": sorted(n for n, g in self.gates.items() if not hasattr(g, "refresh"))} | self.watch

    # -- mixing ----------------------------------------------------------------
    @contextlib.contextmanager
    def mixing(self, weights: torch.Tensor):
        """Within this block, forwards of `self.model` add sum_e w[n, e] s_e B_e A_e x to
        every LoRA layer of sequence n (peft's own adapter path switched off)."""
        from peft.tuners.lora import LoraLayer

        w = weights.to(self.device, torch.float32)
        active = [i for i in range(w.shape[1]) if bool((w[:, i] > 0).any())]
        handles = []

        def hook(module, args, output):
            x = args[0]
            extra = 0
            for i in active:
                name = self.experts[i]
                a, b = module.lora_A[name], module.lora_B[name]
                delta = b(a(x.to(a.weight.dtype))) * module.scaling[name]
                extra = extra + delta * w[:, i].view(-1, *([1] * (delta.dim() - 1))).to(delta.dtype)
            return output + extra

        for module in self.model.modules():
            if isinstance(module, LoraLayer) and all(e in module.lora_A for e in self.experts):
                handles.append(module.register_forward_hook(hook))
        try:
            with self.model.disable_adapter():
                yield
        finally:
            for h in handles:
                h.remove()

    # -- generation ------------------------------------------------------------
    def check_request(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Token ids of a valid request; FedmoeError (one line) otherwise."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise FedmoeError("empty prompt")
        if max_new_tokens < 1:
            raise FedmoeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if self.max_positions and len(ids) + max_new_tokens > self.max_positions:
            raise FedmoeError(f"too many tokens: prompt has {len(ids)} and max_new_tokens is {max_new_tokens}, "
                              f"but the model takes at most {self.max_positions}")
        return ids

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int | list[int] = 16, gate: str | None = None,
                 top_k: int = 1, adapter: str | None = None) -> list[tuple[str, torch.Tensor]]:
        """Greedy completions for a batch of prompts, each with its expert weights.

        `gate` routes (top-1 via adapter_names, top-k>1 via mixing); `adapter` instead
        sends every prompt to one named adapter (set active: a plain single-LoRA forward).
        """
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        ids = [self.check_request(p, n) for p, n in zip(prompts, limits)]
        if gate is not None:
            weights = self.route(prompts, gate, top_k)
        else:
            weights = torch.zeros(len(prompts), len(self.experts))
            if adapter in self.experts:
                weights[:, self.experts.index(adapter)] = 1.0
        pad = self.tokenizer.pad_token_id
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):  # left padding, so every row continues at the end
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        kwargs = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=max(limits), do_sample=False,
                      pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id, use_cache=True)
        with self._lock:
            if gate is None:
                with self._single_adapter(adapter):
                    out = self.model.generate(**kwargs)
            elif top_k == 1:
                names = self.adapter_names(weights)
                if len(set(names)) == 1:  # one expert for the whole batch: a plain single-LoRA forward
                    with self._single_adapter(names[0]):
                        out = self.model.generate(**kwargs)
                else:  # several experts in one batch: peft's mixed-batch inference
                    out = self.model.generate(**kwargs, adapter_names=names)
            else:
                with self.mixing(weights):
                    out = self.model.generate(**kwargs)
        results = []
        for i, n in enumerate(limits):
            new = out[i, width:width + n].tolist()
            if self.tokenizer.eos_token_id in new:
                new = new[: new.index(self.tokenizer.eos_token_id)]
            results.append((self.tokenizer.decode(new, skip_special_tokens=True), weights[i]))
        return results

    def expert_forward(self, names: list[str], **model_kwargs):
        """One forward of the base model where row n runs through expert `names[n]` (or
        `__base__`): a batch for one expert only sets it active (a plain single-LoRA
        forward), a mixed one goes through peft's `adapter_names`. Holds the model lock
        for this one forward, so a caller looping over decoding steps lets other users
        of the model in between steps."""
        with self._lock:
            if len(set(names)) == 1:
                with self._single_adapter(names[0]):
                    return self.model(**model_kwargs)
            return self.model(**model_kwargs, adapter_names=list(names))

    @contextlib.contextmanager
    def _single_adapter(self, adapter: str | None):
        if adapter is None or adapter == BASE:
            with self.model.disable_adapter():
                yield
            return
        if adapter not in self.model.peft_config:
            raise FedmoeError(f"unknown adapter {adapter!r}")
        previous = self.model.active_adapter
        self.model.set_adapter(adapter)
        try:
            yield
        finally:
            self.model.set_adapter(previous)


class MixedExpertsLM(torch.nn.Module):
    """The served model as one module for `evaluate`: forward accepts `adapter_names`
    (top-1 routing, peft's mixed batch) or `expert_weights` (top-k mixing)."""

    def __init__(self, served: ServedModel):
        super().__init__()
        self.served = served
        self.inner = served.model

    def forward(self, input_ids, attention_mask=None, expert_weights=None, **kwargs):
        if expert_weights is not None:
            with self.served.mixing(expert_weights):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
