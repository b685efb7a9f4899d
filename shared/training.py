"""The local LoRA training loop and exact-match evaluation: plain torch + peft.

The same `train_lora` runs in `fedmoe train-local`, in the Flower ClientApp and for the
centralized baseline. A prompt/completion record trains on the completion tokens only
(plus end-of-sequence, so the model learns to stop); a text record trains on all of it.
Exact match is greedy decoding reproducing the completion and then stopping, computed
in one teacher-forced pass: greedy decoding emits the completion iff the argmax at
every completion position is the completion's next token.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from fedmoe.shared.data import Record
from fedmoe.shared.errors import FedmoeError


@dataclass
class TrainConfig:
    steps: int = 60
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_length: int = 128
    grad_clip: float = 1.0
    seed: int = 0
    prox_mu: float = 0.0  # FedProx proximal term weight (0 = plain local SGD)
    # The learning-rate schedule spans the whole federation, not one round: a round's
    # local steps are steps global_step .. global_step + steps - 1 of total_steps
    # (rounds x local steps), so every round continues the same warm-up + cosine curve.
    schedule: str = "constant"  # constant | cosine (linear warm-up, then cosine to 0)
    global_step: int = 0
    total_steps: int = 0  # 0: this call's own steps
    warmup: float = 0.1  # share of total_steps spent warming up (cosine only)

    def __post_init__(self):
        if self.schedule not in LR_SCHEDULES:
            raise FedmoeError(f"unknown lr schedule {self.schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= self.warmup < 1.0 or self.global_step < 0 or self.total_steps < 0:
            raise FedmoeError(f"lr schedule: warmup must be in [0, 1) and steps >= 0, got warmup={self.warmup}, "
                              f"global_step={self.global_step}, total_steps={self.total_steps}")


LR_SCHEDULES = ("constant", "cosine")


def lr_at(cfg: "TrainConfig", step: int) -> float:
    """The learning rate of global step `step` (0-based) under `cfg`'s schedule."""
    if cfg.schedule == "constant":
        return cfg.lr
    total = max(cfg.total_steps or (cfg.global_step + cfg.steps), 1)
    warm = int(round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainResult:
    losses: list[float]
    steps: int
    examples: int
    tokens: int
    seconds: float
    lrs: list[float] = field(default_factory=list)  # the learning rate of every step

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 5):]
        return sum(tail) / len(tail)


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    count: int
    per_domain: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "loss": self.loss, "count": self.count, "per_domain": self.per_domain}


def encode_record(tokenizer, record: Record, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss) for one record."""
    eos = [tokenizer.eos_token_id]
    if record.is_text:
        ids = tokenizer(record.completion, add_special_tokens=False)["input_ids"] + eos
        return ids[:max_length], ids[:max_length]
    p = tokenizer(record.prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(record.completion, add_special_tokens=False)["input_ids"] + eos
    p = p[-(max_length - len(c)):] if len(p) + len(c) > max_length else p
    return p + c, [-100] * len(p) + c


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int, device, left: bool = False) -> dict[str, torch.Tensor]:
    """A padded batch. `left` pads on the left and adds `position_ids`, so every
    completion ends at the last position (what `completion_logits` exploits)."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        start = width - len(x) if left else 0
        ids[i, start : start + len(x)] = torch.tensor(x)
        labels[i, start : start + len(y)] = torch.tensor(y)
        mask[i, start : start + len(x)] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if left:
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return {k: v.to(device) for k, v in batch.items()}


_FORWARD_ARGS: dict[type, bool] = {}


def pads_left(model) -> bool:
    """Whether the model takes `position_ids` and `logits_to_keep` (transformers' causal
    LMs do): then batches are left-padded and the LM head runs only on the positions that
    predict a completion token (measured on the default model's 2048-word head: 0.93x
    the CPU time of a LoRA step)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = type(base)
    if cls not in _FORWARD_ARGS:
        params = inspect.signature(base.forward).parameters
        _FORWARD_ARGS[cls] = "position_ids" in params and "logits_to_keep" in params
    return _FORWARD_ARGS[cls]


def completion_logits(model, batch: dict[str, torch.Tensor], **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, k, vocab], labels [n, k]): the logits that predict each labelled token,
    over the last k positions that hold any label (all of them for text records)."""
    # A label right after padding has no context to be predicted from (the first token of
    # a left-padded text record): as in a right-padded batch, it is not scored.
    labels = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, :-1] == 0, -100)
    labelled = (labels != -100).any(0).nonzero()
    keep = labels.shape[1] - int(labelled[0]) if len(labelled) else 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in inputs:  # a left-padded batch (collate(left=True)) for a model that pads_left
        inputs["logits_to_keep"] = keep + 1
    logits = model(**inputs, **forward_kwargs).logits
    return logits[:, -(keep + 1) : -1].float(), labels[:, -keep:]


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def train_lora(model, tokenizer, records: list[Record], cfg: TrainConfig, progress=None, extra_loss=None) -> TrainResult:
    """Train the model's trainable (LoRA) parameters for `cfg.steps` steps.

    `progress(step, loss)` is called after every step. `extra_loss(model)` (optional)
    adds a term, e.g. a router's auxiliary loss.
    """
    if not records:
        raise FedmoeError("no training records")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise FedmoeError(f"training steps and batch size must be >= 1, got steps={cfg.steps}, batch size={cfg.batch_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise FedmoeError("model has no trainable parameters (attach a LoRA adapter first)")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = model_device(model)
    encoded = [encode_record(tokenizer, r, cfg.max_length) for r in records]
    left = pads_left(model)
    anchor = [p.detach().clone() for p in params] if cfg.prox_mu > 0 else None
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    order: list[int] = []
    losses, lrs, tokens, start = [], [], 0, time.perf_counter()
    for step in range(cfg.steps):
        lrs.append(lr_at(cfg, cfg.global_step + step))
        for group in opt.param_groups:
            group["lr"] = lrs[-1]
        if len(order) < cfg.batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch_idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        batch = collate([encoded[i] for i in batch_idx], tokenizer.pad_token_id, device, left=left)
        logits, labels = completion_logits(model, batch)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
        total = loss
        if anchor is not None:
            total = total + 0.5 * cfg.prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        if extra_loss is not None:
            total = total + extra_loss(model)
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int(batch["attention_mask"].sum())
        if progress is not None:
            progress(step + 1, losses[-1])
    model.eval()
    return TrainResult(losses, cfg.steps, len(records), tokens, time.perf_counter() - start, lrs)


@torch.no_grad()
def score_batch(model, batch: dict[str, torch.Tensor], **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (exact match as bool, mean completion loss)."""
    logits, labels = completion_logits(model, batch, **forward_kwargs)
    mask = labels != -100
    pred = logits.argmax(-1)
    correct = ((pred == labels) | ~mask).all(dim=1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    loss = (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
    return correct.cpu(), loss.cpu()


@torch.no_grad()
def evaluate(model, tokenizer, records: list[Record], batch_size: int = 64, max_length: int = 128, forward_kwargs_fn=None) -> EvalResult:
    """Exact-match accuracy and completion loss, overall and per domain.

    `forward_kwargs_fn(records)` (optional) gives extra forward kwargs per batch, such
    as peft's `adapter_names` for mixed-batch expert routing.
    """
    if not records:
        raise FedmoeError("no evaluation records")
    model.eval()
    device = model_device(model)
    hits: dict[str, list[float]] = defaultdict(list)
    losses: dict[str, list[float]] = defaultdict(list)
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        batch = collate([encode_record(tokenizer, r, max_length) for r in chunk], tokenizer.pad_token_id, device,
                        left=pads_left(model))
        extra = forward_kwargs_fn(chunk) if forward_kwargs_fn else {}
        correct, loss = score_batch(model, batch, **extra)
        for r, c, l in zip(chunk, correct.tolist(), loss.tolist()):
            hits[r.domain or "all"].append(float(c))
            losses[r.domain or "all"].append(l)
    all_hits = [h for v in hits.values() for h in v]
    all_losses = [x for v in losses.values() for x in v]
    per_domain = {
        d: {"accuracy": sum(hits[d]) / len(hits[d]), "loss": sum(losses[d]) / len(losses[d]), "count": len(hits[d])}
        for d in sorted(hits)
    }
    loss = sum(all_losses) / len(all_losses)
    return EvalResult(sum(all_hits) / len(all_hits), loss if math.isfinite(loss) else float("nan"), len(all_hits), per_domain)
