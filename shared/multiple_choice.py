"""Multiple-choice scoring, the lm-evaluation-harness way.

A record with `choices` is answered by the choice the model finds most likely after
the prompt: `acc` picks the highest summed log-likelihood of the choice's tokens,
`acc_norm` the highest log-likelihood divided by the choice's length in characters
(lm-eval's `acc_norm`: `lls / len(choice)`, so long glosses are not penalised for
having more tokens). Exact match on free generation is much harder for a small model
on real glosses; this is the primary score for such data, exact match and loss stay
secondary.

The choice is scored as the record's completion is trained: prompt and choice tokenized
apart, no end-of-sequence (lm-eval scores continuations without one). Every
(record, choice) pair is one sequence, so a batch of `batch_size` sequences scores
several records at once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from fedmoe.shared.data import Record
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.training import collate, completion_logits, model_device, pads_left


@dataclass
class ChoiceScores:
    """Per record: the choices' summed log-likelihoods and which choice is right."""

    logliks: list[list[float]]
    gold: list[int]
    domains: list[str | None]
    choices: list[tuple[str, ...]]

    def picks(self, normalized: bool) -> list[int]:
        out = []
        for lls, choices in zip(self.logliks, self.choices):
            scores = [ll / len(c) for ll, c in zip(lls, choices)] if normalized else lls
            out.append(max(range(len(scores)), key=scores.__getitem__))  # first best on ties, like argmax
        return out


@dataclass
class MultipleChoiceResult:
    acc: float
    acc_norm: float
    count: int
    per_domain: dict[str, dict] = field(default_factory=dict)
    scores: ChoiceScores | None = None

    def as_dict(self) -> dict:
        return {"acc": self.acc, "acc_norm": self.acc_norm, "count": self.count, "per_domain": self.per_domain}


def encode_choice(tokenizer, prompt: str, choice: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (the choice's tokens only) for one (prompt, choice) pair;
    a long prompt loses its start, as in training."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(choice, add_special_tokens=False)["input_ids"][:max_length - 1]
    p = p[-(max_length - len(c)):] if len(p) + len(c) > max_length else p
    return p + c, [-100] * len(p) + c


@torch.no_grad()
def choice_logliks(model, batch: dict[str, torch.Tensor], **forward_kwargs) -> torch.Tensor:
    """Summed log-likelihood of each sequence's labelled tokens."""
    logits, labels = completion_logits(model, batch, **forward_kwargs)
    mask = labels != -100
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logprobs * mask).sum(1).cpu()


def choice_records(records: list[Record]) -> list[Record]:
    return [r for r in records if r.choices]


@torch.no_grad()
def score_records(model, tokenizer, records: list[Record], batch_size: int = 64, max_length: int = 128,
                  forward_kwargs_fn=None) -> MultipleChoiceResult:
    """acc and acc_norm, overall and per domain, over the records that carry choices.

    `forward_kwargs_fn(records)` (optional) gives extra forward kwargs per batch, one
    record per sequence (a record repeats once per choice), e.g. peft's `adapter_names`.
    """
    records = choice_records(records)
    if not records:
        raise FedmoeError("no multiple-choice records (records with 'choices')")
    model.eval()
    device = model_device(model)
    left = pads_left(model)
    pairs = [(i, c) for i, r in enumerate(records) for c in r.choices]
    logliks: list[list[float]] = [[] for _ in records]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = collate([encode_choice(tokenizer, records[i].prompt, c, max_length) for i, c in chunk],
                        tokenizer.pad_token_id, device, left=left)
        extra = forward_kwargs_fn([records[i] for i, _ in chunk]) if forward_kwargs_fn else {}
        for (i, _), ll in zip(chunk, choice_logliks(model, batch, **extra).tolist()):
            logliks[i].append(ll)
    scores = ChoiceScores(logliks, [r.choices.index(r.completion) for r in records], [r.domain for r in records],
                          [r.choices for r in records])
    return summarize(scores)


def summarize(scores: ChoiceScores) -> MultipleChoiceResult:
    hits: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for d, g, p, pn in zip(scores.domains, scores.gold, scores.picks(False), scores.picks(True)):
        hits[d or "all"].append((float(p == g), float(pn == g)))
    per_domain = {d: {"acc": sum(h[0] for h in v) / len(v), "acc_norm": sum(h[1] for h in v) / len(v), "count": len(v)}
                  for d, v in sorted(hits.items())}
    every = [h for v in hits.values() for h in v]
    return MultipleChoiceResult(sum(h[0] for h in every) / len(every), sum(h[1] for h in every) / len(every),
                                len(every), per_domain, scores)
