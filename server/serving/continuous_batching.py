"""Continuous batching for the OpenAI-compatible HTTP API.

One decoding thread owns every request in flight. Each decoding step is one forward of
the base model for all of them, every row through its own expert (peft's mixed-adapter
batch inference, `adapter_names`), so requests for different experts share the pass.
Queued requests join between steps: they are routed (one gate call for all that
arrived), prefilled as one batch, and their KV cache is merged into the running one.

Why our own loop rather than `model.generate`: generate runs a fixed batch to its end,
so a request arriving one step late waits for the longest one in flight; and
per-request temperature / top_p / seed / stop strings, streaming token by token, and
dropping a client that went away all need the step in our hands.

The KV cache is left-padded: a row's real tokens end at the right edge, padding on the
left is masked out (its keys and values are zeros), and positions are tracked per row,
so rows of different lengths decode together. Rows that finish are removed from the
batch, and columns that became padding for every row are cut off.

Hot swap (a live run's newer round, `serving/hot_swap.py`): the decoder holds the model
from the first request of a batch until the batch is empty (`ServedModel.hold`), so a
newer round's experts are swapped in between batches only and every request decodes on
one round (its "routed" event says which). While a swap waits, no request joins the
batch in flight: it drains (bounded by the longest max_tokens), the swap is applied, and
the waiting requests start on the new round.
"""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from fedmoe.shared.errors import FedmoeError


class QueueFull(FedmoeError):
    """The request queue is at its bound: the caller should retry later (HTTP 429)."""


@dataclass
class DecodeRequest:
    """One completion to decode. `emit` is called on the decoding thread with events:
    ("routed", expert, weight, round), ("text", delta), ("done", finish_reason, n_tokens), or
    ("error", exception); "done" or "error" comes last. `round` is the run round whose
    experts decode it (None: not from a run's rounds)."""

    prompt: str
    prompt_ids: list[int]
    emit: Callable[[tuple], None]
    expert: str | None = None  # forced expert; None: `gate` routes
    gate: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # decode max_tokens whatever the model says (benchmarks; vLLM's extension)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    req: DecodeRequest
    expert: str
    pos: int  # position id of the next token fed
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    sent: str = ""  # text already emitted
    pending: int | None = None  # sampled, not yet fed
    finished: bool = False


def sample_tokens(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """Next token per row: argmax at temperature 0, else nucleus sampling with the row's
    own generator (so a seeded request gives the same text whoever shares its batch)."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for i, row in enumerate(rows):
        r = row.req
        if r.temperature <= 0:
            out.append(greedy[i])
            continue
        probs = torch.softmax(logits[i].float().cpu() / r.temperature, -1)
        if r.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            outside = sorted_p.cumsum(0) - sorted_p > r.top_p  # keep the smallest set reaching top_p
            sorted_p[outside] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        out.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return out


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _cache_kwarg(served) -> str:
    # transformers 5.2x renamed the KV cache argument and output `past_key_values` -> `cache`
    import inspect

    params = inspect.signature(served.model.get_base_model().forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _plain_layers(cache) -> list | None:
    """The cache's layers if every one is a plain growing KV layer (whose tensors we may
    pad, join and cut); None otherwise (sliding windows, quantized caches...)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return layers


class ContinuousBatcher:
    """A bounded queue of `DecodeRequest`s and the one thread that decodes them."""

    def __init__(self, served, max_batch: int = 16, max_queue: int = 64, max_wait_s: float = 0.005):
        if max_batch < 1 or max_queue < 1:
            raise FedmoeError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.served, self.max_batch, self.max_wait_s = served, max_batch, max_wait_s
        self.queue: queue.Queue[DecodeRequest | None] = queue.Queue(maxsize=max_queue)
        tok = served.tokenizer
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (self.eos or 0)
        self.rows: list[_Row] = []
        self.cache = None
        self.cache_kwarg = _cache_kwarg(served)
        self.mask: torch.Tensor | None = None
        self.steps = 0
        self.largest_batch = 0
        self.joins = 0  # admissions into a batch already decoding
        self.taken = 0  # requests taken off the queue
        self.mixed_steps = 0  # decoding steps whose rows went to more than one expert
        self.rows_decoded = 0  # sum over steps of the rows in the step (mean batch = rows_decoded / steps)
        self._stopping = False
        self._holding = False  # the model is held for the batch in flight (no hot swap under it)
        self.round = served.round
        self._thread = threading.Thread(target=self._loop, name="fedmoe-decoder", daemon=True)
        self._thread.start()

    def submit(self, req: DecodeRequest) -> None:
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self.queue.maxsize} waiting); retry later") from None

    def stats(self) -> dict:
        return {"steps": self.steps, "mixed_expert_steps": self.mixed_steps, "largest_batch": self.largest_batch,
                "mean_batch": round(self.rows_decoded / self.steps, 3) if self.steps else 0.0,
                "rows_decoded": self.rows_decoded, "joins": self.joins,
                "requests": self.taken, "in_flight": len(self.rows), "queued": self.queue.qsize(), "round": self.round,
                "max_batch": self.max_batch, "max_queue": self.queue.maxsize}

    def stop(self) -> None:
        self._stopping = True
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=10)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self):
        while not self._stopping:
            new = self._take()
            if self._stopping:
                break
            try:
                if new:
                    if not self._holding:  # a new batch: a waiting hot swap goes in first
                        self.round, self._holding = self.served.hold(), True
                    self._admit(new)
                if self.rows:
                    self._step()
            except Exception as exc:  # a bug or an OOM: fail what is in flight, keep serving
                for row in self.rows:
                    row.req.emit(("error", exc))
                self.rows, self.cache, self.mask = [], None, None
            if self._holding and not self.rows:  # the batch is over: a hot swap may go in now
                self._holding = False
                self.served.release()
        for row in self.rows:
            row.req.emit(("error", FedmoeError("the server is shutting down")))
        if self._holding:
            self._holding = False
            self.served.release()

    def _take(self) -> list[DecodeRequest]:
        new = self._take_from_queue()
        self.taken += len(new)
        return new

    def _take_from_queue(self) -> list[DecodeRequest]:
        room = self.max_batch - len(self.rows)
        new: list[DecodeRequest] = []
        if not self.rows:  # idle: wait for one, then a moment for a burst to gather
            first = self.queue.get()
            if first is None:
                return []
            new.append(first)
            try:
                while len(new) < room:
                    nxt = self.queue.get(timeout=self.max_wait_s)
                    if nxt is None:
                        break
                    new.append(nxt)
            except queue.Empty:
                pass
            return new
        if self.cache is not None and _plain_layers(self.cache) is None:
            return []  # this cache cannot be joined: new requests wait for the batch to end
        if self.served.swap_pending:
            return []  # a newer round waits: let this batch drain, then start on it
        while len(new) < room:
            try:
                nxt = self.queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._stopping = True
                break
            new.append(nxt)
        return new

    def _admit(self, reqs: list[DecodeRequest]) -> None:
        served = self.served
        reqs = [r for r in reqs if not r.cancelled.is_set()]
        experts: dict[int, tuple[str, float]] = {}
        for gate in {r.gate for r in reqs if r.expert is None}:
            group = [i for i, r in enumerate(reqs) if r.expert is None and r.gate == gate]
            try:
                weights = served.route([reqs[i].prompt for i in group], gate)
            except Exception as exc:
                for i in group:
                    reqs[i].emit(("error", exc))
                continue
            for i, w in zip(group, weights):
                k = int(w.argmax())
                experts[i] = (served.experts[k], float(w[k]))
        rows = []
        for i, r in enumerate(reqs):
            if r.expert is not None:
                experts[i] = (r.expert, 1.0)
            if i not in experts:
                continue
            name, weight = experts[i]
            r.emit(("routed", name, weight, self.round))
            gen = None
            if r.temperature > 0:
                gen = torch.Generator().manual_seed(r.seed if r.seed is not None else random.getrandbits(63))
            rows.append(_Row(r, name, len(r.prompt_ids), gen))
        if not rows:
            return
        width = max(len(row.req.prompt_ids) for row in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.req.prompt_ids)
            ids[i, width - n:] = torch.tensor(row.req.prompt_ids)
            mask[i, width - n:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        dev = served.device
        try:
            out = served.expert_forward([row.expert for row in rows], input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                        position_ids=pos.to(dev), use_cache=True, logits_to_keep=1)
        except Exception as exc:  # the newcomers' prefill failed: the batch already decoding goes on
            for row in rows:
                row.req.emit(("error", exc))
            return
        joining = bool(self.rows)
        self.rows += rows  # from here a failure fails everyone in flight (see _loop)
        if joining:
            self._join(_returned_cache(out), mask.to(dev))
            self.joins += 1
        else:
            self.cache, self.mask = _returned_cache(out), mask.to(dev)
        for row, tok in zip(rows, sample_tokens(out.logits[:, -1], rows)):
            self._accept(row, tok)
        self._prune()

    def _join(self, cache, mask: torch.Tensor) -> None:
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)], 0)
        for old, new in zip(_plain_layers(self.cache), _plain_layers(cache)):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)], 0)
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)], 0)

    def _step(self) -> None:
        dev = self.served.device
        rows = self.rows
        ids = torch.tensor([[row.pending] for row in rows], dtype=torch.long, device=dev)
        pos = torch.tensor([[row.pos] for row in rows], dtype=torch.long, device=dev)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(rows), 1))], 1)
        out = self.served.expert_forward([row.expert for row in rows], input_ids=ids, attention_mask=self.mask,
                                         position_ids=pos, use_cache=True, **{self.cache_kwarg: self.cache})
        self.cache = _returned_cache(out)
        self.steps += 1
        self.rows_decoded += len(rows)
        self.mixed_steps += len({row.expert for row in rows}) > 1
        self.largest_batch = max(self.largest_batch, len(rows))
        for row in rows:
            row.pos += 1
        for row, tok in zip(rows, sample_tokens(out.logits[:, -1], rows)):
            self._accept(row, tok)
        self._prune()

    # -- per row -----------------------------------------------------------------------------
    def _accept(self, row: _Row, tok: int) -> None:
        """Take a sampled token: finish on EOS, a stop string, max_tokens or the model's
        context; otherwise emit whatever text is now certain and queue it to be fed."""
        req = row.req
        limit = self.served.max_positions
        if tok == self.eos and not req.ignore_eos:
            return self._finish(row, "stop", final_text=None, eos=True)
        row.ids.append(tok)
        text = self.served.tokenizer.decode(row.ids, skip_special_tokens=True)
        for s in req.stop:
            at = text.find(s)
            if at >= 0:
                return self._finish(row, "stop", final_text=text[:at])
        if len(row.ids) >= req.max_tokens or (limit and row.pos >= limit):
            return self._finish(row, "length", final_text=text)
        safe = text.rstrip("\ufffd")  # an unfinished multi-byte character
        for s in req.stop:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, len(safe)), 0, -1):
                if safe.endswith(s[:k]):
                    safe = safe[:-k]
                    break
        if len(safe) > len(row.sent) and safe.startswith(row.sent):
            req.emit(("text", safe[len(row.sent):]))
            row.sent = safe
        row.pending = tok

    def _finish(self, row: _Row, reason: str, final_text: str | None, eos: bool = False) -> None:
        if final_text is None:
            final_text = self.served.tokenizer.decode(row.ids, skip_special_tokens=True)
        if len(final_text) > len(row.sent):
            row.req.emit(("text", final_text[len(row.sent):] if final_text.startswith(row.sent) else final_text))
        row.finished = True
        row.req.emit(("done", reason, len(row.ids) + int(eos)))  # usage counts the EOS token too

    def _prune(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.finished and not row.req.cancelled.is_set()]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.mask = None, None
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        live = self.mask.any(0).nonzero()
        cut = int(live[0]) if len(live) else 0
        layers = _plain_layers(self.cache)
        if cut > 0 and layers is not None:  # columns that are padding for every row left
            self.mask = self.mask[:, cut:]
            for layer in layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
