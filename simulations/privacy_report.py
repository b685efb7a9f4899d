"""The privacy and robustness sections of a simulation report: what chaos injected and
what became of it, robust aggregation, ε per round, and a membership-inference check."""

from __future__ import annotations

from pathlib import Path


def sections(out_dir: Path, model_dir, sites, rounds: int, seed: int, baselines: bool, robust: str, chaos: str | None,
             plan, results: dict, experts: dict[str, Path]) -> dict:
    from fedmoe.server.federation.run_store import RunStore

    store = RunStore(out_dir, readonly=True)
    participation, metrics = store.participation(), store.metrics("dp_epsilon")
    tolerances = [m["value"] for m in store.metrics("secagg_tolerance")]
    store.close()
    strat = plan.strategy
    out: dict = {"robust": robust, "privacy": {"mode": strat.privacy}}
    if strat.privacy == "dp":
        per_round: dict[int, float] = {}
        for m in metrics:
            per_round[m["round"]] = max(per_round.get(m["round"], 0.0), m["value"])
        out["privacy"] |= {"noise_multiplier": strat.noise_multiplier, "clip": strat.site_clip, "delta": strat.dp_delta,
                           "epsilon_budget": strat.epsilon_budget, "accountant": "opacus RDP (site-level)",
                           "epsilon_per_round": [{"round": r, "epsilon": e} for r, e in sorted(per_round.items())],
                           "epsilon": per_round[max(per_round)] if per_round else 0.0,
                           "rounds_run": len(per_round), "stopped": results.get("stopped")}
    if strat.privacy == "secagg":
        out["privacy"] |= {"clip": strat.site_clip, "protocol": "Flower SecAgg+ (one run per domain per round)",
                           "quantization_tolerance": max(tolerances, default=None)}
    if chaos:
        out["chaos"] = chaos_section(chaos, seed, rounds, sites, baselines, participation)
    if experts:
        out["membership_inference"] = membership_inference(model_dir, sites, experts)
    return out


def chaos_section(chaos: str, seed: int, rounds: int, sites, baselines: bool, participation: list[dict]) -> dict:
    from fedmoe.client.chaos import FAULTS, chaos_seed, parse_chaos, schedule
    from fedmoe.server.federation.strategy import SINGLE_EXPERT

    names = [Path(s.path).name for s in sites]
    experts_of = {Path(s.path).name: [s.domain] + ([SINGLE_EXPERT] if baselines else []) for s in sites}
    rows = {(p["round"], p["site"], p["expert"]): p for p in participation}
    seed = chaos_seed(chaos, seed)
    injected = []
    for item in schedule(parse_chaos(chaos), seed, rounds, names, experts_of):
        p = rows.get((item["round"], item["site"], item["expert"]))
        injected.append(item | {"outcome": p["status"] if p else "not sent", "reason": (p or {}).get("reason")})
    table = {}
    for fault in FAULTS:
        hits = [i for i in injected if i["fault"] == fault]
        table[fault] = {"injected": len(hits), **{k: sum(1 for i in hits if i["outcome"] == k) for k in ("rejected", "failed", "ok")}}
    clean = [p for p in participation if (p["round"], p["site"], p["expert"]) not in {(i["round"], i["site"], i["expert"]) for i in injected}]
    table["clean"] = {"injected": 0, **{k: sum(1 for p in clean if p["status"] == k) for k in ("rejected", "failed", "ok")}}
    return {"spec": chaos, "seed": seed, "table": table, "injected": injected}


def membership_inference(model_dir, sites, experts: dict[str, Path]) -> dict:
    """Loss-threshold attack: AUC of -loss separating a site's training records (members)
    from its held-out records (non-members) under the site's domain expert. 0.5 = no signal."""
    from fedmoe.server.federation.privacy import loss_threshold_auc, record_losses
    from fedmoe.shared.data import load_site
    from fedmoe.shared.modeling import load_adapter, load_base_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = None
    for name, path in experts.items():
        model = load_adapter(model or load_base_model(model_dir, "none"), path, adapter_name=name)
    per_site = {}
    for ref in sites:
        if ref.domain not in experts:
            continue
        s = load_site(ref.path, ref.domain)  # one site's records at a time
        if not s.eval:
            continue
        model.set_adapter(s.domain)
        members, nonmembers = record_losses(model, tokenizer, s.train), record_losses(model, tokenizer, s.eval)
        per_site[Path(s.path).name] = {"domain": s.domain, "auc": loss_threshold_auc(members, nonmembers),
                                       "members": len(members), "nonmembers": len(nonmembers)}
    aucs = [v["auc"] for v in per_site.values()]
    return {"attack": "loss threshold", "mean_auc": sum(aucs) / len(aucs) if aucs else None, "per_site": per_site}


def markdown(report: dict) -> str:
    lines = []
    priv = report.get("privacy") or {}
    if priv.get("mode") == "dp":
        lines.append(f"\n**Differential privacy** (site-level, {priv['accountant']}): noise multiplier "
                     f"{priv['noise_multiplier']}, clip {priv['clip']}, ε = {priv['epsilon']:.3f} at δ = {priv['delta']:g} "
                     f"after {priv['rounds_run']} rounds" + (f"; {priv['stopped']}" if priv.get("stopped") else "") + ".\n")
    elif priv.get("mode") not in (None, "none"):
        lines.append(f"\nPrivacy mode: {priv['mode']}.\n")
    if gates := gate_privacy_lines(report):
        lines.append("\n**Gates' privacy** (what the data-driven gates took from the sites):\n\n" + gates)
    if "chaos" in report:
        c = report["chaos"]
        lines.append(f"\n**Chaos** `{c['spec']}` (seed {c['seed']}), robust aggregation `{report.get('robust')}`:\n\n"
                     "| fault | injected | rejected | failed | accepted |\n|---|---|---|---|---|\n")
        lines += [f"| {k} | {v['injected']} | {v['rejected']} | {v['failed']} | {v['ok']} |\n" for k, v in c["table"].items()]
    if mi := report.get("membership_inference"):
        lines.append(f"\nMembership inference ({mi['attack']}): mean AUC {mi['mean_auc']:.3f} (0.5 = no signal).\n")
    return "".join(lines)


def gate_privacy_lines(report: dict) -> str:
    """One bullet per data-driven gate: its (ε, δ), noise multiplier and clip, or "not private"."""
    out = []
    for name, entry in report.get("methods", {}).items():
        gate = entry.get("gate") or {}
        if "private" not in gate:
            continue
        acc = f"routing accuracy {entry['routing_accuracy']:.3f}" if "routing_accuracy" in entry else ""
        if not gate["private"]:
            out.append(f"- `{name}`: **not private** ({gate.get('privacy', 'no noise').removeprefix('not private: ')}); {acc}\n")
            continue
        parts = f"ε = {gate['epsilon']:.3g} at δ = {gate['delta']:g}, noise multiplier {gate['noise_multiplier']:g}, clip {gate['clip_norm']:g}"
        if "epsilon_router" in gate:
            parts += (f" (router {gate['epsilon_router']:.3g} over {gate['rounds']} rounds, {gate.get('accountant', '')}"
                      + (f"; + feature center {gate['epsilon_center']:.3g}" if "epsilon_center" in gate else "") + ")")
        else:
            parts += f" ({gate.get('accountant', '')})"
        out.append(f"- `{name}`: {parts}; {acc}\n")
    return "".join(out)
