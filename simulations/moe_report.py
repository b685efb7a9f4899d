"""The MoE part of `report.json`: every gate and every static merge, measured in one run.

`moe_methods(model_dir, experts, mixed_eval, sites, seed)` builds the served model,
plays the sites' side of the data-driven gates in-process (each site computes its own
prototype message and its own router steps from its own records; the coordinator sees
only what `fedmoe.client.prototype` / `fedmoe.client.router` return), evaluates

    moe_arrow, moe_smile, moe_prototype, moe_learned (top-1 routing, adapter_names)
    static_cat, static_svd, static_ties_svd, static_dare_ties_svd
                                                 (λ, density tuned on the sites' eval records)

on the mixed held-out set (and the conflict set, when given) with
`fedmoe.simulations.method_scores` (multiple-choice acc_norm where the records carry
choices, else exact match), and adds per gate
`routing_accuracy` (share of mixed prompts whose top expert is their own domain's) and
`latency_ratio` (median per-request latency of route + top-1 generation over the same
model with one LoRA active, measured side by side in this run).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from fedmoe.client.prototype import DEFAULT_CLIP_NORM, DEFAULT_NOISE_MULTIPLIER, site_prototype
from fedmoe.client.router import prepare_router_data, local_router_update
from fedmoe.server.moe.gates import GATES, save_gate
from fedmoe.server.moe.gates.arrow import ArrowGate
from fedmoe.server.moe.gates.learned import LearnedGate, RouterPrivacy, federated_router_rounds, router_privacy_info
from fedmoe.server.moe.gates.prototype import PrototypeGate
from fedmoe.server.moe.gates.smile import SmileGate
from fedmoe.server.moe.served_model import ServedModel
from fedmoe.server.moe.static_merge import STATIC_MERGES, add_static_merge, default_params, tune_static_merge
from fedmoe.shared.data import Record, Site
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.features import FeatureConfig, record_prompt
from fedmoe.simulations.method_scores import domain_scores, headline_metric, method_entry, weighted, with_conflict


def _method_result(served: ServedModel, mixed_eval: list[Record], conflict_eval: list[Record], forward_kwargs_fn) -> dict:
    """A report entry (`method_scores.method_entry`): headline acc_norm on multiple-choice
    records, else exact match; the conflict set through the same routing."""
    scores = domain_scores(served.lm, served.tokenizer, mixed_eval, forward_kwargs_fn)
    clash = domain_scores(served.lm, served.tokenizer, conflict_eval, forward_kwargs_fn)
    return method_entry(with_conflict(scores, clash), headline_metric(mixed_eval))


def validation_split(sites: list[Site], per_site: int = 8) -> list[Record]:
    """Validation data for tuning static merges: the first records of each site's own
    eval split (never the mixed test set)."""
    return [r for s in sites for r in s.eval[:per_site]]


def _merge_score(served: ServedModel, name: str, records: list[Record]) -> tuple[float, float]:
    """The report's headline metric on validation records; loss breaks the ties small
    validation sets have."""
    scores = domain_scores(served.lm, served.tokenizer, records, served.expert_kwargs_fn(name))
    return (weighted(scores, headline_metric(records)), -weighted(scores, "loss"))


def routing_accuracy(served: ServedModel, gate: str, records: list[Record]) -> tuple[float, dict[str, float]]:
    weights = served.route([record_prompt(r) for r in records], gate)
    chosen = served.adapter_names(weights)
    hits: dict[str, list[float]] = {}
    for r, e in zip(records, chosen):
        hits.setdefault(r.domain, []).append(float(e == r.domain))
    overall = sum(sum(v) for v in hits.values()) / len(records)
    return overall, {d: sum(v) / len(v) for d, v in sorted(hits.items())}


def measure_latency(served: ServedModel, gate: str, prompts: list[str], max_new_tokens: int = 8,
                    repeats: int = 1, warmup: int = 2) -> dict:
    """Per-request (batch of one) latency of route + top-1 gated generation vs the same
    model with one expert active (a single-LoRA model), alternating request by request so
    both see the same machine load. Returns medians in ms and their ratio."""
    single = served.experts[0]
    for p in prompts[:warmup]:
        served.generate([p], max_new_tokens, gate=gate)
        served.generate([p], max_new_tokens, adapter=single)
    gated, plain = [], []
    for _ in range(repeats):
        for p in prompts:
            t = time.perf_counter()
            served.generate([p], max_new_tokens, adapter=single)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            served.generate([p], max_new_tokens, gate=gate)
            gated.append(time.perf_counter() - t)
    g, s = statistics.median(gated), statistics.median(plain)
    return {"gated_ms": 1000 * g, "single_lora_ms": 1000 * s, "latency_ratio": g / s, "requests": len(gated),
            "max_new_tokens": max_new_tokens}


def build_gates(served: ServedModel, sites: list[Site], seed: int = 0, gates=tuple(GATES),
                clip_norm: float = DEFAULT_CLIP_NORM, noise_multiplier: float = DEFAULT_NOISE_MULTIPLIER,
                router_rounds: int = 20, router_local_steps: int = 10, router_lr: float = 0.01,
                prototype_temperature: float = 0.05, router_max_records: int | None = None, progress=None,
                router_privacy: RouterPrivacy | None = RouterPrivacy()) -> dict:
    """Build the requested gates on `served` (in-process sites); returns build info per gate.
    `router_privacy` None trains the learned gate without DP (its entry then says "not private").
    Each data-driven gate's info says its privacy in one shape: `private`, `epsilon`, `delta`,
    `noise_multiplier`, `clip_norm`."""
    say = progress or (lambda text: None)
    info: dict[str, dict] = {}
    unknown = [g for g in gates if g not in GATES]
    if unknown:
        raise FedmoeError(f"unknown gate {unknown[0]!r}: choose from {', '.join(GATES)}")
    if "arrow" in gates:
        served.add_gate("arrow", ArrowGate(served, seed=seed))
        info["arrow"] = {"data_used": 0}
    if "smile" in gates:
        served.add_gate("smile", SmileGate(served))
        info["smile"] = {"data_used": 0}
    messages = []
    if "prototype" in gates:
        say("prototype gate: sites compute their DP-noised prototypes")
        for site in sites:
            msg = site_prototype(served.featurizer, site.train, clip_norm, noise_multiplier)
            messages.append((site.domain, msg))
        served.add_gate("prototype", PrototypeGate.from_messages(served, messages, prototype_temperature))
        eps = messages[0][1].epsilon(1e-5) if messages else None
        info["prototype"] = {"sites": len(messages), "private": bool(noise_multiplier > 0), "clip_norm": clip_norm,
                             "noise_multiplier": noise_multiplier, "epsilon": eps, "delta": 1e-5,
                             "accountant": "analytic Gaussian (one release per site)",
                             "epsilon_at_delta_1e-5": eps,
                             "bytes_per_site": int(messages[0][1].prototype.numel() * 4) if messages else 0}
    if "learned" in gates:
        say("learned gate: sites score their records under the frozen experts")
        datas = [prepare_router_data(served.model, served.tokenizer, served.featurizer, s.train[:router_max_records], served.experts)
                 for s in sites]
        # The router's feature center: the mean of the DP prototypes (post-processing of that
        # release: the prototype gate's own, or the same messages made for this gate).
        if not messages:
            messages = [(s.domain, site_prototype(served.featurizer, s.train, clip_norm, noise_multiplier)) for s in sites]
        center = PrototypeGate.from_messages(served, messages, prototype_temperature).center
        clip = router_privacy.clip if router_privacy else None
        steps = [lambda state, d=d, i=i: local_router_update(state, d, router_local_steps, router_lr, seed=seed * 1000 + i,
                                                             clip=clip)
                 for i, d in enumerate(datas)]

        def said(r, m):
            say(f"router round {r}/{router_rounds}: " + (f"loss {m['router_loss']:.3f}" if "router_loss" in m else
                                                          f"DP noise std {m['noise_std']:.3g}, epsilon {m['epsilon']:.3g}"))

        state, history = federated_router_rounds(served.featurizer.cfg.dim, len(served.experts), steps, router_rounds,
                                                 progress=said, privacy=router_privacy, center=center)
        served.add_gate("learned", LearnedGate(served, state))
        priv = router_privacy_info(router_privacy, router_rounds, len(datas), (messages[0][1].epsilon(1e-5), 1e-5))
        info["learned"] = {"rounds": router_rounds, "local_steps": router_local_steps, "history": history,
                           "bytes_per_site_round": int(sum(v.numel() for v in state.values()) * 4), **priv}
    return info


def moe_methods(model_dir: str | Path, experts: dict[str, Path], mixed_eval: list[Record], sites: list[Site],
                seed: int = 0, gates=tuple(GATES), static_merges=tuple(STATIC_MERGES), device: str | None = None,
                feature_config: FeatureConfig | None = None, gate_dir: str | Path | None = None,
                latency_requests: int = 16, latency_new_tokens: int = 8, include_oracle: bool = False,
                progress=None, conflict_eval: list[Record] = (), **gate_options) -> dict[str, dict]:
    """report.json entries for the MoE gates and the static merges.

    `experts`: domain -> peft adapter dir. `mixed_eval`: records with `domain`.
    `sites`: the sites, whose side of the gates runs in-process. `gate_dir` (e.g.
    RUN/gates): where to save the gates so `fedmoe serve` can load them.
    `conflict_eval` (optional): the suite's conflict set, scored per method as "conflict".
    Returns {method: {"per_domain", "mixed", "loss", ...}}; the headline is acc_norm when
    the records carry choices, else exact match (`method_scores`).
    """
    say = progress or (lambda text: None)
    if not mixed_eval:
        raise FedmoeError("no mixed evaluation records")
    missing = sorted({r.domain for r in mixed_eval} - set(experts))
    if missing:
        raise FedmoeError(f"mixed eval has domain(s) {', '.join(missing)} with no expert")
    torch.manual_seed(seed)
    served = ServedModel(model_dir, experts, device, feature_config)
    methods: dict[str, dict] = {}
    if include_oracle:
        methods["experts_oracle"] = _method_result(served, mixed_eval, conflict_eval,
                                                   lambda recs: {"adapter_names": [r.domain for r in recs]})
    # Static merges first, and removed again: the arrow router treats every adapter
    # on the model as an expert.
    validation = validation_split(sites)
    for method in static_merges:
        say(f"static merge {method}: tuning on {len(validation)} site eval records")
        params = tune_static_merge(served, method, validation, lambda name, recs: _merge_score(served, name, recs), seed=seed)[0] \
            if validation else default_params(method, len(served.experts))
        name = add_static_merge(served.model, served.experts, method, params=params, seed=seed)
        methods[f"static_{method}"] = _method_result(served, mixed_eval, conflict_eval, served.expert_kwargs_fn(name)) \
            | {"params": params, "validation_records": len(validation)}
        served.model.delete_adapter(name)
    info = build_gates(served, sites, seed, gates, progress=progress, **gate_options)
    prompts = [record_prompt(r) for r in mixed_eval][:latency_requests]
    for gate in gates:
        say(f"gate {gate}: evaluating")
        acc, per_domain = routing_accuracy(served, gate, mixed_eval)
        entry = _method_result(served, mixed_eval, conflict_eval, served.forward_kwargs_fn(gate)) | {"routing_accuracy": acc, "routing_per_domain": per_domain}
        if latency_requests:
            lat = measure_latency(served, gate, prompts, latency_new_tokens)
            entry |= {"latency_ratio": lat["latency_ratio"], "latency": lat}
        entry["gate"] = info.get(gate, {}) | {"site_requirements": GATES[gate].site_requirements}
        methods[f"moe_{gate}"] = entry
        if gate_dir is not None:
            save_gate(served.gates[gate], gate_dir)
    if gate_dir is not None:
        import json

        Path(gate_dir).mkdir(parents=True, exist_ok=True)
        (Path(gate_dir) / "features.json").write_text(json.dumps(served.featurizer.cfg.as_dict(), indent=2))
    return methods
