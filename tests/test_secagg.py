"""Secure aggregation (`--privacy secagg`): a real Flower simulation in which every
domain's round is one SecAgg+ run (Flower's `SecAggPlusWorkflow` + `secaggplus_mod`).

The ServerApp's Grid is wrapped so that every message the coordinator's code receives is
recorded. Each site's unmasked update is then recomputed here from exactly what the
coordinator sent it (the same site code, seeded training), and the test shows that
(1) no array the coordinator received is any site's update — its replies carry only
masked integers and empty ArrayRecords — and (2) the committed expert equals the
plaintext FFA-LoRA aggregate (`frozen_a_aggregate`) of those updates within SecAgg+'s
quantization tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

CLIP = 0.5
RANKS = (4, 8, 8, 8)
FAULTY = 3  # this site drops out mid-protocol; SecAgg+ still unmasks the other three's sum


class RecordingGrid:
    """A Grid that records every message pushed and every reply pulled."""

    def __init__(self, grid):
        self._grid, self.sent, self.received = grid, [], []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def push_messages(self, messages):
        messages = list(messages)
        self.sent += messages
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        self.received += replies
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent += messages
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.received += replies
        return replies


@pytest.fixture(scope="module")
def secagg_run(tmp_path_factory, tiny_model_dir):
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedmoe.client.client_app import build_client_app
    from fedmoe.server.federation.server_app import FederationPlan, run_federation
    from fedmoe.server.federation.strategy import StrategyConfig
    from fedmoe.simulations.domain_suite import make_suite

    root = tmp_path_factory.mktemp("secagg")
    make_suite(root / "suite", domains=1, sites=4, seed=0)
    site_plan = [{"data-path": str(root / "suite" / f"site-0{i}"), "rank": rank, "quant": "none", "model-path": str(tiny_model_dir)}
                 for i, rank in enumerate(RANKS)]
    site_plan[FAULTY]["chaos"] = "nan=1,seed=0"  # its update is NaN: it fails SecAgg+'s masked-vector stage
    plan = FederationPlan(model_dir=str(tiny_model_dir), out_dir=str(root / "run"), rounds=1, expected_nodes=len(RANKS),
                          strategy=StrategyConfig(local_steps=1, batch_size=4, privacy="secagg", clip=CLIP, round_timeout=300))
    grids: list[RecordingGrid] = []
    results: dict = {}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        grids.append(RecordingGrid(grid))
        results.update(run_federation(grids[0], plan))

    run_simulation(server_app=app, client_app=build_client_app(site_plan), num_supernodes=len(site_plan),
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"include_dashboard": False, "log_to_driver": False}})
    assert results.get("experts"), "the federation did not finish"
    return {"grid": grids[0], "plan": plan, "site_plan": site_plan, "out": root / "run", "experts": results["experts"]}


def site_updates(run) -> dict[int, tuple[list[np.ndarray], int]]:
    """node id -> (the site's unmasked update, its num-examples) for the sound sites,
    recomputed from the FitIns the coordinator sent each, through the site's own code."""
    from fedmoe.client.jobs import train_in_process
    from fedmoe.client.secagg import is_secagg_fit, masked_input
    from fedmoe.client.site import SiteSettings
    from flwr.common import parameters_to_ndarrays

    grid = run["grid"]
    names = {r.metadata.src_node_id: r.content["config"]["site"] for r in grid.received
             if r.metadata.message_type == "query.describe"}
    by_name = {entry["data-path"].rsplit("/", 1)[-1]: entry for entry in run["site_plan"]}
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the simulation's 1-CPU actors
    try:
        for msg in grid.sent:
            if not is_secagg_fit(msg):
                continue
            entry = by_name[names[msg.metadata.dst_node_id]]
            if "chaos" in entry:
                continue
            settings = SiteSettings.from_node_config(entry)
            res = masked_input(msg.content, lambda arrays, cfg: train_in_process(settings, arrays, cfg))
            out[msg.metadata.dst_node_id] = (parameters_to_ndarrays(res.parameters), res.num_examples)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_coordinator_never_holds_a_site_update_and_secagg_equals_plaintext(secagg_run):
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from fedmoe.server.federation.privacy import frozen_a_aggregate
    from fedmoe.server.federation.run_store import RunStore
    from fedmoe.server.federation.secagg import quantization_tolerance
    from fedmoe.server.federation.strategy import DomainExpertStrategy, Node
    from fedmoe.shared.modeling import adapter_spec_for, model_fingerprint

    updates = site_updates(secagg_run)
    assert len(updates) == 3
    counts = [n for _, n in updates.values()]
    plan = secagg_run["plan"]
    store = RunStore(secagg_run["out"], readonly=True)
    try:
        assert store.run()["state"] == "finished"
        rows = {r["site"]: r for r in store.participation(1)}
        expert = store.checkpoint(secagg_run["experts"][0], 1)
        tol = store.metrics("secagg_tolerance")[0]["value"]  # what the coordinator reports
    finally:
        store.close()
    faulty = Path(secagg_run["site_plan"][FAULTY]["data-path"]).name
    assert rows.pop(faulty)["status"] == "failed"
    assert [r["status"] for r in rows.values()] == ["ok"] * 3
    assert tol >= quantization_tolerance(3, CLIP, sum(counts) / max(counts))
    flat = {nid: np.concatenate([a.ravel() for a in u]) for nid, (u, _) in updates.items()}
    # Sites differ, and each trained (a zero update would be trivially "hidden").
    assert all(np.abs(v).max() > 100 * tol for v in flat.values())

    # (1) What the coordinator received: describe answers, SecAgg+ keys and shares, masked
    # integers. No reply carries an array, and no masked vector is near any site's update.
    grid = secagg_run["grid"]
    masked = []
    errors = [r for r in grid.received if r.has_error()]
    assert len(errors) == 1 and "not finite" in errors[0].error.reason  # the faulty site, in the masked-vector stage
    for reply in grid.received:
        if reply.has_error():
            continue
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        cfg = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if cfg is not None and Key.MASKED_PARAMETERS in cfg:
            masked.append(np.concatenate([bytes_to_ndarray(b).ravel() for b in cfg[Key.MASKED_PARAMETERS]][1:]))
    assert len(masked) == 3
    for vec in masked:
        # Masked: spread over [0, 2^32), not the quantized update (below Q = 2^28).
        assert vec.max() > 2 ** 31 and np.unique(vec).size > 0.9 * vec.size
        for u in flat.values():
            assert vec.shape == u.shape and not np.allclose(vec, u, atol=1e3 * tol)

    # (2) The committed expert = the plaintext FFA-LoRA aggregate of the sound sites' updates.
    spec = adapter_spec_for(plan.model_dir)
    modules = expert.modules()
    strategy = DomainExpertStrategy(plan.strategy, spec, model_fingerprint(plan.model_dir))
    for i, (nid, (u, n)) in enumerate(sorted(updates.items())):
        strategy.add_node(Node(nid, f"s{i}", "d", 8, strategy.fingerprint, n))
    a0 = strategy.init_adapter(8)
    plaintext = frozen_a_aggregate(None, a0, [({m: torch.from_numpy(a).double() for m, a in zip(modules, u)}, float(n))
                                              for u, n in updates.values()], plan.strategy.alpha_per_rank)
    scale = plan.strategy.alpha_per_rank
    worst, mean_scale = 0.0, 0.0
    for m in modules:
        a, b = expert.factors(m)
        assert torch.allclose(a, a0.factors(m)[0], rtol=1e-6, atol=1e-7)  # A stayed the shared frozen A_0
        want = plaintext[m].b.double() * scale ** 0.5  # s B of the plaintext aggregate
        got = b.double() * expert.scaling
        worst = max(worst, float((got - want).abs().max()))
        mean_scale = max(mean_scale, float(want.abs().max()))
    print(f"secagg vs plaintext FFA aggregate: max |diff| {worst:.3g} (tolerance {tol:.3g}, largest coordinate {mean_scale:.3g})")
    assert worst <= tol + 1e-6 * mean_scale  # float32 storage of the checkpoint
    for nid, (u, _) in updates.items():  # the aggregate is not one site's update either
        assert max(float(np.abs(b - a).max()) for b, a in zip(
            [expert.factors(m)[1].double().numpy() * expert.scaling for m in modules], u)) > 100 * tol


def test_secagg_needs_two_sites_per_expert():
    from fedmoe.server.federation.secagg import secagg_round
    from fedmoe.server.federation.strategy import DomainExpertStrategy, Node, StrategyConfig
    from fedmoe.shared.delta import AdapterSpec
    from fedmoe.shared.errors import FedmoeError

    s = DomainExpertStrategy(StrategyConfig(privacy="secagg"), AdapterSpec({"m.q_proj": (8, 8)}), "fp")
    s.add_node(Node(1, "site-1", "law", 4, "fp", 10))
    with pytest.raises(FedmoeError, match="at least 2 sites"):
        secagg_round(None, s, 1)


def test_quantization_range_never_wraps_the_masked_sum():
    from fedmoe.server.federation.secagg import quantization_range, quantization_tolerance

    for n in (2, 3, 5, 16, 100, 1000):
        q = quantization_range(n)
        assert n * q <= 2 ** 30 and q <= 2 ** 28 and q & (q - 1) == 0
    assert quantization_tolerance(2, 1.0) == pytest.approx(2 * 2 / 2 ** 28)


def test_secagg_refuses_options_that_need_single_updates():
    from fedmoe.server.federation.strategy import DomainExpertStrategy, StrategyConfig
    from fedmoe.shared.delta import AdapterSpec
    from fedmoe.shared.errors import FedmoeError

    for extra in ({"robust": "norm"}, {"compression": "int8"}):
        with pytest.raises(FedmoeError, match="never sees a single update"):
            StrategyConfig(privacy="secagg", **extra)
    with pytest.raises(FedmoeError, match="--clip must be > 0"):
        DomainExpertStrategy(StrategyConfig(privacy="secagg", clip=0.0), AdapterSpec({"m.q_proj": (8, 8)}), "fp")
