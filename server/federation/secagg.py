"""Secure aggregation (`--privacy secagg`): each domain expert's round is one run of
Flower's SecAgg+ protocol (`flwr.server.workflow.SecAggPlusWorkflow`) over that
domain's sampled sites, so the coordinator learns only per-domain aggregates.

Why this is exact: sites train B only, against the expert's frozen shared A (FFA-LoRA),
and send u_k = s (B_k - B_0) zero-padded to the expert's rank (fedmoe.client.secagg).
ΔW is linear in B, so the weighted mean Σ p_k u_k that SecAgg+ reveals *is* the update
`frozen_a_aggregate` computes in plaintext (`--privacy ffa`), up to SecAgg+'s quantization.

Weighting: the workflow itself uploads [w_k, w_k u_k] masked, with w_k = num-examples /
`max_weight`, and divides the unmasked sums — p_k = n_k / Σ n, the same weights as the
plaintext modes. `max_weight` is the largest num-examples the group's sites announced
(so every w_k ≤ 1 and no site's weighted update leaves the clipping range).

Quantization: SecAgg+ clips each coordinate to [-c, c] and maps it to an integer in
[0, Q). Sites clip ||u_k|| ≤ C (`--clip`, all modules together), so |every coordinate|
≤ C and c = C never clips. Q is the largest power of two ≤ 2^28 with n Q ≤ 2^30 (the
masked sums live modulo 2^32), so the aggregate's error per coordinate is below
n · 2C / Q (stochastic rounding, unbiased): 1.5e-8 C for a pair of sites.

The protocol is Flower's, driven here round by round: a `LegacyContext` whose strategy
(`DomainSum`) hands out one FitIns per sampled node (the expert at the node's rank) and
receives, in `aggregate_fit`, results whose parameters have already been replaced by the
unmasked aggregate. A group needs at least 2 sampled sites (SecAgg+'s minimum; with
exactly 2, each site could subtract its own update from the next round's expert). Per-site
example counts (the weights, also in the describe reply) and seconds travel in plaintext
beside the masked vector; the training loss does not (the sites withhold it, and the
coordinator records none), and the coordinator cannot screen single updates (robust
aggregation does not apply).
Domains run one after the other; a stage waits at most `round-timeout`.

Caveat, Flower 1.42: `pseudo_rand_gen` (flwr/common/secure_aggregation/secaggplus_utils.py),
which expands every private and pairwise mask seed, XOR-folds the seed to 32 bits and uses
np.random.RandomState (flwrlabs/flower#7522, open). The masks hide updates from a coordinator
that follows the protocol, but one willing to search 2^32 seeds per pairwise mask could
unmask a site. The protection is Flower's; it improves when Flower's PRG does.
"""

from __future__ import annotations

import math
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedmoe.shared.errors import DeltaValidationError, FedmoeError

RECONSTRUCTION_THRESHOLD = 2 / 3  # of the shares; > 1/2 so the server can never rebuild both a site's masks


def quantization_range(num_sites: int) -> int:
    """The largest power of two ≤ 2^28 (Flower quantizes to int32) with n Q ≤ 2^30: the
    masked sums live modulo 2^32, and n values below Q each never wrap."""
    return 2 ** min(28, 30 - math.ceil(math.log2(max(num_sites, 2))))


def quantization_tolerance(num_sites: int, clip: float, weight_sum: float = 1.0) -> float:
    """Bound on |SecAgg+ mean - plaintext weighted mean| per coordinate: each site's
    coordinate is off by less than one step 2C/Q; the sum is divided by Σ w_k (≥ 1 when
    the heaviest site took part)."""
    return num_sites * 2 * clip / quantization_range(num_sites) / weight_sum


class DomainSum(Strategy):
    """The legacy strategy of one SecAgg+ aggregation (one expert, one round)."""

    def __init__(self, grid, fitins: dict[int, FitIns]):
        self.grid, self.fitins = grid, fitins
        self.aggregate: list[np.ndarray] | None = None
        self.results: dict[int, dict] = {}
        self.failures: list = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        run_id = self.grid.run.run_id
        return [(GridClientProxy(nid, self.grid, run_id), ins) for nid, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        # The workflow has put the unmasked aggregate into every result's parameters.
        self.failures = list(failures)
        self.results = {proxy.node_id: {"num-examples": res.num_examples, **res.metrics} for proxy, res in results}
        if not results:
            return None, {}
        self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secure_mean(grid, rnd: int, fitins: dict[int, FitIns], clip: float, max_weight: float, timeout: float) -> DomainSum:
    """One SecAgg+ run over the nodes in `fitins`; the returned strategy holds what the
    coordinator learned: the weighted mean (`aggregate`, None if the protocol halted)
    and each site's plaintext metrics."""
    strategy = DomainSum(grid, fitins)
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy, client_manager=SimpleClientManager())
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # each node's FitIns carries its own slice
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=RECONSTRUCTION_THRESHOLD, max_weight=float(max_weight),
                                  clipping_range=float(clip), quantization_range=quantization_range(len(fitins)), timeout=timeout)
    workflow(grid, context)
    return strategy


def secagg_round(grid, strategy, rnd: int):
    """A training round of `DomainExpertStrategy` in secagg mode: one SecAgg+ run per
    expert over its sampled sites. Returns the round's `RoundResult`."""
    from fedmoe.server.federation.strategy import RoundResult

    result = RoundResult()
    for expert, nodes in strategy.groups().items():
        sampled = strategy.sample(nodes, rnd, expert)
        if len(sampled) < 2:
            raise FedmoeError(f"secure aggregation needs at least 2 sites per expert; {expert!r} has {len(sampled)} this round "
                              f"(of {len(nodes)}; raise --min-nodes / --fraction, or add sites)")
        secure_expert_round(grid, strategy, rnd, expert, sampled, result)
    for expert in strategy.groups():
        failed = sum(1 for p in result.participation if p["expert"] == expert and p["status"] != "ok")
        result.metrics.setdefault(expert, {})["sites_failed"] = failed
    return result


def secure_expert_round(grid, strategy, rnd: int, expert: str, sampled: list, result) -> None:
    """SecAgg+ over `sampled`; the expert becomes frozen_a_aggregate(current, A_0, [(mean, 1)])."""
    from fedmoe.server.federation.privacy import frozen_a_aggregate
    from fedmoe.shared.fitins import adapter_to_fitins, update_from_arrays

    r_max, clip = strategy.max_rank(expert), strategy.privacy.clip
    sent = {n.node_id: strategy.expert_for_rank(expert, n.rank) for n in sampled}
    fitins = {nid: adapter_to_fitins(d, strategy.train_config(rnd, expert, n) | {"secagg-rank": r_max})
              for n in sampled for nid, d in [(n.node_id, sent[n.node_id])]}
    max_weight = max(n.num_examples for n in sampled)
    started = time.perf_counter()
    summed = secure_mean(grid, rnd, fitins, clip, max_weight, strategy.cfg.round_timeout)
    seconds = time.perf_counter() - started
    ok = summed.results  # node id -> that site's plaintext metrics (num-examples, train loss)
    total = sum(m["num-examples"] for m in ok.values())
    tolerance = quantization_tolerance(len(sampled), clip, max(total / max_weight, 1e-9))
    mean, why = None, "secure aggregation halted (a SecAgg+ stage had too few sites)"
    if summed.aggregate is not None:
        try:
            mean = update_from_arrays(summed.aggregate, strategy.init_adapter(r_max), r_max)
            check_mean_norm(mean, clip, tolerance)
        except DeltaValidationError as exc:
            mean, why = None, f"secure aggregate refused: {exc}"
            result.rejections.append({"site": "(secure sum)", "node_id": 0, "expert": expert, "reason": why})
    for n in sampled:
        row = {"site": n.site, "node_id": n.node_id, "expert": expert, "bytes_out": sent[n.node_id].num_bytes()}
        if mean is not None and (m := ok.get(n.node_id)) is not None:
            row |= {"status": "ok", "num_examples": int(m["num-examples"]), "seconds": seconds}  # no per-site loss under secagg
        else:
            row |= {"status": "failed", "reason": why if mean is None else
                    "no masked update (the site failed or missed a SecAgg+ stage); the others' sum was unmasked"}
        result.participation.append(row)
    if mean is None:
        return
    strategy.experts[expert] = frozen_a_aggregate(strategy.experts.get(expert), strategy.init_adapter(r_max), [(mean, 1.0)],
                                                  strategy.cfg.alpha_per_rank)
    strategy.restore(expert, strategy.expert_delta(expert))
    result.metrics[expert] = {"sites_ok": len(ok), "update_norm": strategy.expert_delta(expert).update_norm(),
                              "secagg_tolerance": tolerance}


def check_mean_norm(mean: dict, clip: float, tolerance: float) -> None:
    """A weighted mean of updates each of norm ≤ C has norm ≤ C: more means a site skipped
    its clip (or the sum wrapped), and the aggregate is refused rather than applied."""
    from fedmoe.server.federation.privacy import update_norm

    numel = sum(t.numel() for t in mean.values())
    bound = clip * (1 + 1e-4) + tolerance * numel ** 0.5
    if (norm := update_norm(mean)) > bound:
        raise DeltaValidationError(f"norm {norm:.4g} exceeds the clip bound {bound:.4g}: a site did not clip its update")
