"""The site side of the learned gate: local steps on the router, experts frozen.

The router is linear on the shared routing feature (`fedmoe.shared.features`), K
logits for K experts. A site prepares, once, its prompts' features and every frozen
expert's log-likelihood of each record's completion (peft `adapter_names`, one pass
per expert). The local objective is the mixture-of-experts likelihood
    -log sum_e softmax(router(x))_e p_e(y | x),
so the router learns to send a prompt to the expert that answers it best, with no
domain label needed. Local steps are plain SGD, so the mean of the sites' updates is a
gradient step on the union of their data (a site with one domain would otherwise, under
Adam's sign-like steps, cancel out against the others); the coordinator adds Adam on
top (FedAdam). Only the router's weights travel, in both directions.

Under router DP (`clip` given) the site clips its update (new - received weights, all
tensors together, Frobenius norm) to `clip` before replying, and replies with weights and
its example count only: its loss and agreement stay here, like the pre-clip norm (they are
functions of its records that the coordinator's noise does not cover). The coordinator
adds the Gaussian noise to the mean (fedmoe.server.moe.gates.learned).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.features import LinearRouter, PromptFeaturizer, record_prompt
from fedmoe.shared.training import collate, encode_record, pads_left, score_batch


@dataclass
class RouterSiteData:
    features: torch.Tensor  # [n, dim]
    loglik: torch.Tensor    # [n, K]: log p_e(completion | prompt) under each frozen expert

    @property
    def count(self) -> int:
        return int(self.features.shape[0])


@torch.no_grad()
def prepare_router_data(model, tokenizer, featurizer: PromptFeaturizer, records, experts: list[str],
                        batch_size: int = 64, max_length: int = 128) -> RouterSiteData:
    """Features and per-expert completion log-likelihoods of a site's records.
    `model` is a peft model holding the experts as named adapters (frozen)."""
    records = [r for r in records if not r.is_text]
    if not records:
        raise FedmoeError("no prompt/completion records to train the router on")
    feats = featurizer([record_prompt(r) for r in records])
    device = next(model.parameters()).device
    rows = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        batch = collate([encode_record(tokenizer, r, max_length) for r in chunk], tokenizer.pad_token_id, device,
                        left=pads_left(model))
        ntok = (batch["labels"][:, 1:] != -100).sum(1).float().cpu()
        cols = []
        for e in experts:
            _, loss = score_batch(model, batch, adapter_names=[e] * len(chunk))
            cols.append(-loss * ntok)
        rows.append(torch.stack(cols, dim=1))
    return RouterSiteData(feats, torch.cat(rows))


def moe_nll(logits: torch.Tensor, loglik: torch.Tensor) -> torch.Tensor:
    return -(torch.log_softmax(logits, dim=-1) + loglik).logsumexp(dim=-1).mean()


def clip_router_update(new: dict[str, torch.Tensor], received: dict[str, torch.Tensor],
                       clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """(received + c (new - received), norm before clipping), c = min(1, clip / norm)."""
    if not clip > 0:
        raise FedmoeError(f"router clip must be > 0, got {clip}")
    diff = {k: new[k].double() - received[k].double() for k in received}
    norm = float(sum((d ** 2).sum() for d in diff.values())) ** 0.5
    c = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (received[k].double() + c * diff[k]).to(received[k].dtype) for k in received}, norm


def local_router_update(state: dict[str, torch.Tensor], data: RouterSiteData, steps: int = 10, lr: float = 0.01,
                        batch_size: int = 64, seed: int = 0, clip: float | None = None) -> tuple[dict[str, torch.Tensor], int, dict]:
    """`steps` SGD steps on the MoE likelihood from the received router weights;
    returns (new weights, examples, metrics). With `clip` (router DP) the update is
    clipped to that norm and the metrics are empty: nothing else data-dependent leaves."""
    router = LinearRouter(data.features.shape[1], data.loglik.shape[1])
    router.load_state_dict(state)
    opt = torch.optim.SGD(router.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, data.count, (min(batch_size, data.count),), generator=gen)
        loss = moe_nll(router(data.features[idx]), data.loglik[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        agree = (router(data.features).argmax(1) == data.loglik.argmax(1)).float().mean().item()
    new = {k: v.detach().clone() for k, v in router.state_dict().items()}
    if clip is not None:
        new, _ = clip_router_update(new, state, clip)  # the pre-clip norm is data-dependent: it stays here
        return new, data.count, {}
    return new, data.count, {"router_loss": sum(losses[-5:]) / len(losses[-5:]), "best_expert_agreement": agree}
