"""The Flower ServerApp: a QUERY round to learn who the sites are, then training rounds
of `DomainExpertStrategy`, each committed to the run store before the next starts."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedmoe.server.federation.evaluation import eval_round_due, evaluate_round
from fedmoe.server.federation.experts import save_expert
from fedmoe.server.federation.faults import armed_faults
from fedmoe.server.federation.run_store import RunStore
from fedmoe.server.federation.strategy import SINGLE_EXPERT, DomainExpertStrategy, ShortRoundError, node_from_describe, send_round
from fedmoe.server.federation.run_config import FederationPlan, StrategyConfig  # noqa: F401 (re-exported)
from fedmoe.shared.config import from_flat
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.modeling import adapter_spec_for, model_fingerprint
from fedmoe.shared.names import inside
from fedmoe.shared.runs import write_run_info


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        ids = sorted(grid.get_node_ids())
        if len(ids) >= expected or time.monotonic() >= deadline:
            return ids
        time.sleep(0.5)


def query_sites(grid: Grid, node_ids: list[int], timeout: float) -> list[tuple[int, dict | None, str | None]]:
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query.describe") for n in node_ids]
    sent = [("query", None, m) for m in msgs]
    replies = send_round(grid, sent, timeout)
    out = []
    for node_id, reply in zip(node_ids, replies):
        if reply is None:
            out.append((node_id, None, "no reply to describe"))
        elif reply.has_error():
            out.append((node_id, None, f"site error: {reply.error.reason}"[:300]))
        else:
            out.append((node_id, dict(reply.content["config"]), None))
    return out


def run_federation(grid: Grid, plan: FederationPlan, progress=log) -> dict:
    """One federation; whatever stops it early, run.db says "failed", never "running"."""
    store = None

    def opened(s: RunStore) -> RunStore:
        nonlocal store
        store = s
        return s

    try:
        return _run_federation(grid, plan, progress, opened)
    except BaseException:
        if store is not None and store.run().get("state") == "running":
            store.finish_run("failed")
        raise


def _run_federation(grid: Grid, plan: FederationPlan, progress, opened) -> dict:
    out = Path(plan.out_dir)
    armed_faults()  # a mistyped FEDMOE_FAULT fails here, not in the middle of a round
    fingerprint = model_fingerprint(plan.model_dir)
    spec = adapter_spec_for(plan.model_dir)
    strategy = DomainExpertStrategy(plan.strategy, spec, fingerprint, rounds=plan.rounds)
    store = opened(RunStore(out))
    if not plan.resume:
        store.start_run(plan.preset, plan.strategy.seed, asdict(plan))
        write_run_info(out, model=str(plan.model_dir), base_fingerprint=fingerprint, preset=plan.preset,
                       seed=plan.strategy.seed, aggregation=plan.strategy.aggregation, rounds=plan.rounds)
    node_ids = wait_for_nodes(grid, plan.expected_nodes, plan.node_wait)
    if not node_ids:
        store.finish_run("failed")
        raise FedmoeError(f"no site connected within {plan.node_wait:.0f}s")
    for node_id, info, error in query_sites(grid, node_ids, plan.query_timeout):
        if info is None:
            progress(f"site node {node_id} left out: {error}")
            continue
        try:
            node = node_from_describe(node_id, info, plan.strategy)
        except FedmoeError as exc:  # that site's rejection, recorded; the others go on
            store.reject_site(node_id, str(exc))
            progress(f"site node {node_id} refused: {exc}")
            continue
        reason = strategy.add_node(node)
        store.upsert_site(node_id, node.site, node.domain, node.rank, node.fingerprint, node.num_examples)
        if reason:
            progress(f"site {node.site} refused: {reason}")
    groups = strategy.groups()
    if not groups:
        store.finish_run("failed")
        raise FedmoeError("no usable site answered the describe query")
    progress("experts: " + ", ".join(f"{e} ({len(n)} sites, ranks {sorted({x.rank for x in n})})" for e, n in groups.items()))
    if plan.resume and strategy.server_opt is not None:
        raise FedmoeError(f"cannot resume a run with --server-opt {plan.strategy.server_opt}: its Adam moments are not checkpointed")
    first = resume_experts(store, strategy, list(groups), progress) + 1 if plan.resume else 1
    history, stopped = [], None
    for rnd in range(first, plan.rounds + 1):
        if stopped := strategy.budget_stop(rnd):
            progress(stopped)
            break
        store.begin_round(rnd)
        started = time.perf_counter()
        if plan.strategy.privacy == "secagg":
            from fedmoe.server.federation.secagg import secagg_round

            result = secagg_round(grid, strategy, rnd)
        else:
            sent = strategy.configure_train(rnd)
            try:
                replies, resends = strategy.collect_train(grid, rnd, sent)
            except ShortRoundError:
                store.finish_run("failed")
                raise
            result = strategy.aggregate_train(rnd, sent, replies, resends)
        if eval_round_due(rnd, plan.rounds, plan.strategy.eval_every):  # committed with the round, below
            # a site that did not answer this round's TRAIN is not asked again: it would hold
            # the round for another deadline (measured: a killed site added 60 s to a deployed run)
            gone = {p.get("node_id") for p in result.participation if p.get("status") == "failed"}
            for expert, m in evaluate_round(grid, strategy, rnd, send_round, progress, skip=gone).items():
                result.metrics.setdefault(expert, {}).update(m)
        store.commit_round(rnd, result.participation, result.metrics, result.rejections,
                           {e: strategy.expert_delta(e) for e in strategy.experts})
        for p in result.participation:
            if p["status"] == "ok":
                store.touch_site(p["site"])
        for expert, m in result.metrics.items():
            nbytes = sum(p.get("bytes_in", 0) + p.get("bytes_out", 0) for p in result.participation if p["expert"] == expert)
            progress(f"round {rnd}/{plan.rounds}  {expert:<10} loss {m.get('train_loss', float('nan')):.3f}  "
                     + (f"eval acc {m['eval_accuracy']:.3f}  " if "eval_accuracy" in m else "")
                     + f"sites ok {int(m.get('sites_ok', 0))} failed {int(m.get('sites_failed', 0))}  {nbytes / 1e6:.2f} MB"
                     + (f"  re-sent {int(m['resends'])}" if m.get("resends") else "")
                     + ("  short round: aggregated what arrived" if m.get("short_round") else ""))
        for r in result.rejections:
            progress(f"round {rnd}: rejected update from node {r['node_id']} ({r['expert']}): {r['reason']}")
        history.append({"round": rnd, "seconds": time.perf_counter() - started, "metrics": result.metrics})
    top_rank = max(n.rank for n in strategy.nodes.values())
    for expert in strategy.experts:
        target = inside(out, out / ("baselines/fedavg_single" if expert == SINGLE_EXPERT else f"experts/{expert}"), "expert folder")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        # Every expert at the federation's largest rank (extra components have B = 0, so
        # each ΔW is unchanged): peft's static merges need equal ranks across experts.
        save_expert(strategy.expert_for_rank(expert, top_rank), partial, plan.model_dir, domain=expert,
                    aggregation=plan.strategy.aggregation, rounds=plan.rounds)
        shutil.rmtree(target, ignore_errors=True)
        partial.replace(target)
    store.finish_run("finished")
    store.close()
    return {"history": history, "experts": sorted(e for e in strategy.experts if e != SINGLE_EXPERT), "stopped": stopped}


def resume_experts(store: RunStore, strategy: DomainExpertStrategy, experts: list[str], progress) -> int:
    """Restore every expert from the newest round whose checkpoints all verify; forget
    later (uncommitted or corrupt) rounds. Returns that round (0: start afresh)."""
    rnd, saved, problems = store.verified_round()
    for line in problems:
        progress(line)
    store.discard_after(rnd)
    for expert in saved:
        if expert in experts:
            strategy.restore(expert, store.checkpoint(expert, rnd))
    if strategy.accountant is not None:
        # The RDP accountant lives in memory: replay the Gaussian steps of the kept rounds
        # (one per round that aggregated; the sample rate is fixed by the plan).
        for _ in {m["round"] for m in store.metrics("dp_epsilon")}:
            strategy.accountant.step(strategy.sample_rate(), strategy.steps_per_round())
    progress(f"resuming after round {rnd}" if rnd else "resuming: no verified round, starting from round 1")
    return rnd


def build_server_app(plan: FederationPlan | None = None, results: dict | None = None) -> ServerApp:
    """`plan` given: simulation. Otherwise the plan is read from the run config (deployment)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            summary = run_federation(grid, plan or plan_from_run_config(context.run_config))
        except FedmoeError as exc:
            if results is not None:
                results["error"] = str(exc)  # the simulation's caller reports it in one line
            raise
        if results is not None:
            results.update(summary)

    return app


def plan_from_run_config(cfg) -> FederationPlan:
    from fedmoe.shared.pretrain import ensure_default_model

    plan = from_flat(FederationPlan, dict(cfg), where="run config")
    return replace(plan, model_dir=plan.model_dir or str(ensure_default_model()), preset="deployed")


app = build_server_app()
