"""`fedmoe simulate`: a whole federation on one machine (Flower Simulation Engine on
Ray), then every method of the report scored on the mixed held-out set."""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedmoe.shared.data import find_sites, load_conflict_eval, load_mixed_eval, site_ref
from fedmoe.shared.errors import FedmoeError
from fedmoe.server.federation.run_config import StrategyConfig
from fedmoe.shared.config import from_json, option, to_json
from fedmoe.simulations.presets import PRESETS, SimPreset, with_overrides

METHOD_ORDER = ("base", "local_only", "fedavg_single", "centralized_single", "experts_oracle", "centralized",
                "centralized_pooled")


def run_curves(out_dir: Path) -> dict:
    from fedmoe.server.federation.evaluation import eval_curves
    from fedmoe.server.federation.run_store import RunStore

    store = RunStore(out_dir, readonly=True)
    try:
        return eval_curves(store)
    finally:
        store.close()


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def prepare_suite(preset: SimPreset, data_dir: str | None) -> Path:
    if data_dir:
        return Path(data_dir)
    from fedmoe.shared.pretrain import cache_dir
    from fedmoe.simulations.domain_suite import make_suite

    if preset.suite == "wordnet":
        from fedmoe.simulations.wordnet_suite import DEFAULT_DOMAINS, make_wordnet_suite

        path = (cache_dir() / "suites" / f"wordnet-d{preset.domains}-s{preset.sites}-t{preset.terms_per_domain}"
                f"-seed{preset.seed}")
        if not (path / "conflict-eval.jsonl").exists():  # the builder's last file
            make_wordnet_suite(path, list(DEFAULT_DOMAINS[:preset.domains]), preset.sites_per_domain, preset.seed,
                               terms_per_domain=preset.terms_per_domain)
        return path
    path = cache_dir() / "suites" / f"d{preset.domains}-s{preset.sites}-seed{preset.seed}"
    if not (path / "mixed-eval.jsonl").exists():
        make_suite(path, preset.domains, preset.sites, preset.seed)
    return path


def backend_config_for(ray_address: str | None, gpus_per_site: float = 0.0) -> dict:
    """Flower's Ray backend config: one CPU per site, no dashboard (it would be one more listener)."""
    init_args = {"include_dashboard": False, "log_to_driver": False} | ({"address": ray_address} if ray_address else {})
    return {"client_resources": {"num_cpus": 1, "num_gpus": gpus_per_site}, "init_args": init_args}


def gpus_per_site(sites: int, gpus: float) -> float:
    """Each site actor's `num_gpus` when Ray has `gpus` GPUs: as many sites share a GPU as
    must, so that every site has a place at once (Flower sizes its actor pool node by node
    from these). With no GPU, none: Ray hides the GPU from an actor that asks for none."""
    if gpus < 1 or sites < 1:
        return 0.0
    return 1.0 / math.ceil(sites / int(gpus))


def check_ray_address(address: str) -> None:
    """`--ray-address` is HOST:PORT and something listens there (Ray would retry for minutes)."""
    import socket

    from fedmoe.shared.network import split_host_port

    host, port = split_host_port(address, "--ray-address")
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise FedmoeError(f"--ray-address {address}: no Ray head answers there ({e.strerror or e}); "
                          f"start one with `ray start --head --port {port}`") from None


def join_ray_cluster(address: str) -> float:
    """Connect this process to the Ray cluster at `--ray-address` before Flower does (Flower
    then uses this connection), so that a wrong address or a missing token is a one-line
    error instead of a run that hangs; returns the cluster's GPU count."""
    import ray

    try:  # Flower's own ray.init adds a PYTHONPATH runtime_env: the driver's paths mean nothing on other machines
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # ConnectionError, ray.exceptions.AuthenticationError, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedmoeError(f"--ray-address {address}: could not join the Ray cluster ({reason[:200]}); a cluster "
                          "started with RAY_AUTH_MODE=token needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN "
                          "or RAY_AUTH_TOKEN_PATH) here too") from None
    return float(ray.cluster_resources().get("GPU", 0))


def run_flower(plan, site_plan: list[dict], ray_address: str | None) -> dict:
    from contextlib import nullcontext

    from fedmoe.shared.network import split_host_port
    from fedmoe.simulations.local_ray import cluster_mode_off, loopback_only, loopback_ray

    import torch

    results: dict = {}
    if ray_address:  # the operator's cluster, its token (if any) in our environment
        check_ray_address(ray_address)
        context = cluster_mode_off() if loopback_only(*split_host_port(ray_address)) else nullcontext()
    else:
        context = loopback_ray()  # a Ray we start: loopback only, token auth
    with context:
        if ray_address:  # the cluster's GPUs, wherever they are: this machine may have none
            gpus = join_ray_cluster(ray_address)
        else:
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend_config = backend_config_for(ray_address, gpus_per_site(len(site_plan), gpus))
        from flwr.simulation import run_simulation  # imports ray: inside, so that Ray sees RAY_AUTH_MODE

        from fedmoe.client.client_app import build_client_app
        from fedmoe.server.federation.server_app import build_server_app

        run_simulation(server_app=build_server_app(plan, results), client_app=build_client_app(site_plan),
                       num_supernodes=len(site_plan), backend_config=backend_config)
    if "error" in results:
        raise FedmoeError(results["error"])
    if "experts" not in results:
        raise FedmoeError(f"the federation did not finish; see the log above and {plan.out_dir}/run.db")
    return results


def site_plan_for(sites, preset: SimPreset, model_dir, chaos: str | None = None) -> list[dict]:
    """Each virtual node's settings (its node config), by partition id: ranks cycled over the sites."""
    plan = [{"data-path": str(s.path), "domain": s.domain, "rank": preset.ranks[i % len(preset.ranks)],
             "quant": preset.quant, "model-path": str(model_dir)} for i, s in enumerate(sites)]
    for entry in plan if chaos else ():
        entry["chaos"] = chaos
    return plan


def score_adapters(model_dir: Path, adapters: dict[str, Path], mixed, route, conflict=()) -> dict[str, dict]:
    """Per-domain scores (`method_scores.domain_scores`, conflict set included) where each
    domain's records are scored by adapter `route(domain)`."""
    from fedmoe.shared.modeling import load_adapter, load_base_model, load_tokenizer
    from fedmoe.simulations.method_scores import domain_scores, with_conflict

    tokenizer = load_tokenizer(model_dir)
    model = None
    for name, path in adapters.items():
        model = load_adapter(model or load_base_model(model_dir, "none"), path, adapter_name=name)
    out = {}
    for domain in sorted({r.domain for r in mixed}):
        model.set_adapter(route(domain))
        scores = domain_scores(model, tokenizer, [r for r in mixed if r.domain == domain])
        out |= with_conflict(scores, domain_scores(model, tokenizer, [r for r in conflict if r.domain == domain]))
    return out


@dataclass
class SimulationOptions:
    """What `fedmoe simulate` runs besides the federation's own config (StrategyConfig)."""

    data_dir: str | None = option(None, help="suite folder of site folders + mixed-eval.jsonl (default: generated)")
    rounds: int | None = option(None, help="federated rounds (default: the preset's)")
    model: str | None = option(None, help="base model: a folder or a fetchable name such as smollm2-135m "
                                          "(default: the preset's)")
    ranks: tuple[int, ...] | None = option(None, help="LoRA ranks cycled over the sites, e.g. 4,8,16 (default: the preset's)")
    quant: str | None = option(None, choices=("nf4", "int8", "none"), help="site base-model quantization")
    sites_per_domain: int | None = option(None, help="sites per domain of the generated suite (default: the preset's)")
    ray_address: str | None = option(None, help="run on an existing Ray cluster at this address")
    baselines: bool = option(True, help="train local_only, fedavg_single and centralized beside the federation")
    moe: bool = option(True, help="score the MoE gates and static merges (moe_*, static_*)")
    mia: bool = option(True, help="the membership-inference check in the report")
    chaos: str | None = option(None, help='faulty sites, e.g. "nan=0.1,shape=0.05,scale=0.1,dropout=0.2"')
    router_noise_multiplier: float = option(0.0, help="learned gate: DP noise multiplier of the router rounds "
                                                      "(default 0: no clip, no noise, and the report says 'not "
                                                      "private'; 1.0 costs routing accuracy, see README)")
    router_clip: float = option(0.1, help="learned gate: norm bound of a site's router update under router DP")


# StrategyConfig fields a preset sets (a flag overrides them; "default: the preset's")
PRESET_FIELDS = ("local_steps", "batch_size", "lr", "seed", "fraction")


@dataclass
class SimulationRun:
    """One `fedmoe simulate`: the preset, the options and the federation's StrategyConfig
    with the preset's values filled in. `simulate.json` is this, as JSON."""

    preset: str = option("smoke", choices=tuple(PRESETS), help="scenario size and model")
    options: SimulationOptions = field(default_factory=SimulationOptions)
    strategy: StrategyConfig = field(default_factory=lambda: preset_strategy("smoke"))


def preset_strategy(name: str) -> StrategyConfig:
    if name not in PRESETS:
        raise FedmoeError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    return StrategyConfig(round_timeout=600, **{f: getattr(p, f) for f in PRESET_FIELDS})


def preset_run(name: str) -> SimulationRun:
    """The run `--preset NAME` describes before any other flag."""
    return SimulationRun(preset=name, strategy=preset_strategy(name))


def resume_run(out: str) -> SimulationRun:
    """The run in `out` as it was started (its simulate.json)."""
    path = Path(out) / "simulate.json"
    if not (Path(out) / "run.db").exists() or not path.exists():
        raise FedmoeError(f"nothing to resume in {out}: no run.db / simulate.json from `fedmoe simulate`")
    return from_json(SimulationRun, json.loads(path.read_text()), where=str(path))


def simulate(run: SimulationRun, out: str, resume: bool = False) -> dict:
    import torch

    from fedmoe.server.federation.server_app import FederationPlan
    from fedmoe.simulations.baselines import BASELINES, BaselineWorker, worker_groups
    from fedmoe.shared.commands import resolve_model_dir
    from fedmoe.shared.modeling import load_base_model, load_tokenizer
    from fedmoe.shared.training import TrainConfig
    from fedmoe.simulations.method_scores import domain_scores, headline_metric, method_entry, with_conflict

    opts, preset_name = run.options, run.preset
    if preset_name not in PRESETS:
        raise FedmoeError(f"unknown preset {preset_name!r}: choose one of {', '.join(PRESETS)}")
    # the preset, with the options and the strategy's values in force (checked by with_overrides)
    preset = with_overrides(PRESETS[preset_name], {"model": opts.model, "ranks": opts.ranks, "quant": opts.quant,
                                                  "sites_per_domain": opts.sites_per_domain,
                                                  **{f: getattr(run.strategy, f) for f in PRESET_FIELDS}})
    data_dir, ray_address, baselines, moe, mia, chaos = (opts.data_dir, opts.ray_address, opts.baselines, opts.moe,
                                                         opts.mia, opts.chaos)
    rounds = preset.rounds if opts.rounds is None else opts.rounds
    if rounds < 1:
        raise FedmoeError(f"--rounds must be >= 1, got {rounds}")
    if ray_address:
        check_ray_address(ray_address)  # before anything is written to --out
    strategy = replace(run.strategy, single_expert=baselines)  # checked here, before anything is written to --out
    aggregation, compression, robust = strategy.aggregation, strategy.compression, strategy.robust
    server_opt, prox_mu = strategy.server_opt, strategy.prox_mu
    if chaos:
        from fedmoe.client.chaos import chaos_seed, format_chaos, parse_chaos

        chaos = format_chaos(parse_chaos(chaos), chaos_seed(chaos, preset.seed))
    wall = time.perf_counter()
    from fedmoe.shared.modeling import check_model_dir

    model_dir = check_model_dir(resolve_model_dir(preset.model))  # may fetch a named model, before --out is touched
    out_dir = Path(out)
    if (out_dir / "run.db").exists() and not resume:
        raise FedmoeError(f"{out_dir} already holds a run (run.db); choose another --out, or --resume it")
    if not resume:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "simulate.json").write_text(json.dumps(to_json(run), indent=2))
    suite = prepare_suite(preset, data_dir)
    sites = [site_ref(p) for p in find_sites(suite)]  # domains only: the actors read a site's records
    mixed = load_mixed_eval(suite)
    conflict = load_conflict_eval(suite)  # [] for the synthetic suite
    metric = headline_metric(mixed)
    unknown = sorted({r.domain for r in mixed} - {s.domain for s in sites})
    if unknown:
        raise FedmoeError(f"{suite}/mixed-eval.jsonl has domain {unknown[0]!r} that no site holds")
    site_plan = site_plan_for(sites, preset, model_dir, chaos)
    plan = FederationPlan(model_dir=str(model_dir), out_dir=str(out_dir), rounds=rounds, strategy=strategy,
                          expected_nodes=len(sites), preset=preset_name, resume=resume)
    stages = StageClock()
    workers = []
    if baselines:  # independent of the federation: trained beside it (fedmoe.simulations.baselines)
        cfg = TrainConfig(steps=preset.local_steps * rounds, batch_size=preset.batch_size, lr=preset.lr, seed=preset.seed)
        groups = worker_groups(len(sites), cfg.steps)
        workers = [BaselineWorker(model_dir, preset.quant, suite, cfg, names, preset.ranks) for names in groups]
        log(f"baselines {', '.join(BASELINES)}: training in {len(workers)} worker process(es) beside the federation")
    try:
        log(f"simulating {len(sites)} sites ({', '.join(sorted({s.domain for s in sites}))}) for {rounds} rounds, "
            f"{aggregation} aggregation, {preset.quant} sites -> {out_dir}")
        with stages("federation"):
            results = run_flower(plan, site_plan, ray_address)
        fed_seconds = stages.seconds["federation"]
        threads = torch.get_num_threads()
        if any(w.running() for w in workers):  # the baseline workers keep a core while they run
            torch.set_num_threads(1)

        counts = {d: sum(1 for r in mixed if r.domain == d) for d in sorted({r.domain for r in mixed})}
        methods: dict[str, dict] = {}

        def add(name: str, scores: dict[str, dict]) -> None:
            methods[name] = method_entry(scores, metric)
            log(f"scored {name}: mixed {metric} {methods[name]['mixed']:.3f}")

        tokenizer = load_tokenizer(model_dir)
        experts = {d: out_dir / "experts" / d for d in results["experts"]}
        with stages("scoring"):
            base_model = load_base_model(model_dir, "none")
            add("base", with_conflict(domain_scores(base_model, tokenizer, mixed), domain_scores(base_model, tokenizer, conflict)))
            del base_model
            if experts:
                add("experts_oracle", score_adapters(model_dir, experts, mixed, lambda d: d, conflict))
                methods["experts_oracle"]["trained"] = {
                    "steps": f"{rounds} rounds x {preset.local_steps}", "rank": "the domain's largest site rank",
                    "data": "the domain's sites, federated"}
            if baselines:
                add("fedavg_single", score_adapters(model_dir, {"all": out_dir / "baselines/fedavg_single"}, mixed,
                                                    lambda d: "all", conflict))
                methods["fedavg_single"]["trained"] = {
                    "steps": f"{rounds} rounds x {preset.local_steps}", "rank": "the largest site rank",
                    "data": "every site, federated"}
        if moe and len(experts) > 1:
            from fedmoe.simulations.moe_report import moe_methods

            with stages("moe"):
                moe_results = moe_methods(model_dir, experts, mixed, [s.load() for s in sites], seed=preset.seed, gate_dir=out_dir / "gates",
                                          router_max_records=64, router_rounds=preset.router_rounds,
                                          router_privacy=router_privacy(opts),
                                          latency_requests=preset.latency_requests, progress=log, conflict_eval=conflict)
            for name, entry in moe_results.items():
                methods[name] = entry
                log(f"scored {name}: mixed {metric} {entry['mixed']:.3f}")
        if workers:
            with stages("baselines (waiting)"):
                done = [w.result() for w in workers]
            torch.set_num_threads(threads)
            for names, result in zip(groups, done):
                stages.seconds[f"baseline {' + '.join(names)} (worker)"] = result["seconds"]
                for name in names:
                    add(name, result[name]["scores"])
                    methods[name]["trained"] = result[name]["trained"]
        report = {
            "preset": preset_name, "seed": preset.seed, "aggregation": aggregation, "rounds": rounds, "quant": preset.quant,
            "model": str(model_dir), "local_steps": preset.local_steps, "lr": preset.lr, "batch_size": preset.batch_size,
            "ranks": list(preset.ranks), "fraction": preset.fraction,
            "sites": len(sites), "domains": sorted(counts), "mixed_eval_records": len(mixed),
            "metric": metric, "conflict_eval_records": len(conflict),
            "methods": {m: methods[m] for m in METHOD_ORDER if m in methods} | {m: v for m, v in methods.items() if m not in METHOD_ORDER},
            "federation_seconds": fed_seconds, "stage_seconds": stages.seconds, "history": results["history"],
            "compression": compression, "server_opt": server_opt, "prox_mu": prox_mu, **wire_bytes(out_dir),
        }
        from fedmoe.simulations import privacy_report

        with stages("privacy report"):
            report |= privacy_report.sections(out_dir, model_dir, sites, rounds, preset.seed, baselines, robust, chaos, plan,
                                              results, experts if mia else {})
        report["curves"] = run_curves(out_dir)  # per-round site evaluation (fedmoe.server.federation.evaluation)
        report["curves_metric"] = metric  # the sites score multiple-choice eval splits by acc_norm, others by exact match
        report["wall_seconds"] = time.perf_counter() - wall
        write_report(out_dir, report)
        return report
    finally:
        for w in workers:
            w.stop()


def router_privacy(opts: SimulationOptions):
    """The learned gate's router DP from the options (None: off)."""
    from fedmoe.server.moe.gates.learned import RouterPrivacy

    if opts.router_noise_multiplier < 0:
        raise FedmoeError(f"--router-noise-multiplier must be >= 0, got {opts.router_noise_multiplier}")
    return RouterPrivacy(opts.router_noise_multiplier, opts.router_clip) if opts.router_noise_multiplier > 0 else None


class StageClock:
    """Wall seconds per named stage of a run (report.json `stage_seconds`), logged as each ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        log(f"{name}: {self.seconds[name]:.1f}s")


def wire_bytes(out_dir: Path) -> dict:
    """Encoded adapter bytes per site per round, each way, from the run store."""
    from fedmoe.server.federation.run_store import RunStore

    store = RunStore(out_dir, readonly=True)
    rows = [p for p in store.participation() if p["status"] == "ok"]
    store.close()
    site_rounds = len({(p["round"], p["node_id"]) for p in rows}) or 1
    up, down = sum(p["bytes_in"] or 0 for p in rows), sum(p["bytes_out"] or 0 for p in rows)
    return {"bytes_per_site_round": {"up": up / site_rounds, "down": down / site_rounds, "total": (up + down) / site_rounds}}


def report_table(report: dict) -> str:
    """Per method: the headline per domain and mixed, plus the conflict set's and the
    exact match beside a multiple-choice headline (columns only where some method has
    them), and what each method trained (or a static merge's tuned values)."""
    domains = report["domains"]
    methods = report["methods"].values()
    extra = [k for k in ("conflict", "exact_match") if any(k in v for v in methods)]
    if report.get("metric", "exact_match") == "exact_match" and "exact_match" in extra:
        extra.remove("exact_match")
    described = any("trained" in v or "params" in v for v in methods)
    columns = ["method", *domains, "mixed", *(k.replace("_", " ") for k in extra), *(["trained"] if described else [])]
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    cell = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    rows = "".join(f"| {m} | " + " | ".join(f"{v['per_domain'].get(d, float('nan')):.3f}" for d in domains)
                   + f" | **{v['mixed']:.3f}** |" + "".join(f" {cell(v.get(k))} |" for k in extra)
                   + (f" {trained_text(v)} |" if described else "") + "\n"
                   for m, v in report["methods"].items())
    return head + rows


def trained_text(entry: dict) -> str:
    """`trained` as "steps N · rank r · data", or a static merge's tuned parameters."""
    if "trained" in entry:
        t = entry["trained"]
        rank = t["rank"] if isinstance(t["rank"], str) else f"rank {t['rank']}"
        text = f"steps {t['steps']} · {rank} · {t['data']}"
        ceiling = (t.get("ceiling") or {}).get("mixed")
        return text + (f" (its data holds {ceiling:.0%} of its domain's eval answers)" if ceiling is not None else "")
    if "params" in entry:
        return "tuned on site eval data: " + ", ".join(f"{k} {v:g}" for k, v in entry["params"].items())
    return ""


METRIC_WORDS = {
    "exact_match": "Exact-match accuracy on the mixed held-out set (phrasings unseen in training)",
    "acc_norm": ("Multiple-choice accuracy (acc_norm: length-normalized log-likelihood, as lm-evaluation-harness) on "
                 "the mixed held-out set (phrasings unseen in training); `conflict`: the same on the terms defined in "
                 "several domains; `exact match`: greedy decoding of the right gloss"),
}


def write_report(out_dir: Path, report: dict) -> None:
    from fedmoe.shared.runs import write_atomically

    write_atomically(out_dir / "report.json", json.dumps(report, indent=2, default=str))
    md = (f"# fedmoe simulation: preset `{report['preset']}`\n\n"
          f"{report['sites']} sites, {len(report['domains'])} domains, {report['rounds']} rounds, "
          f"{report['aggregation']} aggregation, {report['quant']} sites; seed {report['seed']}. "
          f"Wall time {report['wall_seconds']:.0f}s (federation {report['federation_seconds']:.0f}s). "
          f"Adapters on the wire: {report.get('compression', 'none')}, "
          f"{report.get('bytes_per_site_round', {}).get('total', 0) / 1e3:.1f} kB per site per round.\n\n"
          f"{METRIC_WORDS[report.get('metric', 'exact_match')]}:\n\n" + report_table(report)
          + privacy_markdown(report)
          + "\n![accuracy](accuracy.png)\n\n![loss](loss.png)\n")
    write_atomically(out_dir / "report.md", md)
    plot_report(out_dir, report)


def privacy_markdown(report: dict) -> str:
    from fedmoe.simulations.privacy_report import markdown

    return markdown(report)


def plot_report(out_dir: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedmoe.server.federation.run_store import RunStore

    names = list(report["methods"])
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.1), 4))
    ax.bar(names, [report["methods"][m]["mixed"] for m in names], color="#4C72B0")
    ax.set_ylabel(f"mixed {report.get('metric', 'exact_match').replace('_', ' ')} accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"accuracy per method ({report['preset']} preset)")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=110)
    plt.close(fig)

    store = RunStore(out_dir, readonly=True)
    rows = store.metrics("train_loss")
    store.close()
    fig, ax = plt.subplots(figsize=(6, 4))
    for expert in sorted({r["expert"] for r in rows}):
        pts = [(r["round"], r["value"]) for r in rows if r["expert"] == expert]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=expert)
    ax.set_xlabel("round")
    ax.set_ylabel("site training loss (weighted mean)")
    ax.set_title("loss per round per expert")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=110)
    plt.close(fig)
