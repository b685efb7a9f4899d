"""`DomainExpertStrategy`: one LoRA expert per domain, trained by that domain's sites.

Round by round: sample each expert's nodes (fraction, minimum), send each node the
expert sliced to its rank, collect replies within a deadline (late or failed nodes
are counted, never waited on forever), validate every reply (keys, shapes, dtypes,
finite, norm bound, base fingerprint, checksum) and aggregate the accepted ones —
exactly (Σ p_k s_k B_k A_k, re-factorized by truncated SVD) or naively (FedIT).
A round short of `min_replies` accepted replies for an expert proceeds with what
arrived, or re-sends to the missing sites first (`short_round`, `collect_train`).
An optional `all` expert trained by every node gives the `fedavg_single` baseline.
"""

from __future__ import annotations

import math
import random
import time
import zlib
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict

from fedmoe.server.federation.aggregation import (LowRank, exact_lora_aggregate, initial_adapter, naive_lora_aggregate,
                                       to_site_delta)
from fedmoe.server.federation.faults import fault_point
from fedmoe.shared import compression
from fedmoe.shared.delta import AdapterSpec, LoraDelta
from fedmoe.shared.errors import DeltaValidationError, FedmoeError
from fedmoe.shared.names import check_name, shown
from fedmoe.shared.privacy_modes import METRICS_WITHHELD
from fedmoe.server.federation.run_config import SERVER_OPTIMIZERS, SHORT_ROUND_POLICIES, StrategyConfig  # noqa: F401

SINGLE_EXPERT = "all"


@dataclass(slots=True)
class Node:
    """All the strategy keeps per site between rounds (the sites' data, adapters and
    replies live only in the round that uses them), so 1,000 sites cost 1,000 of these."""

    node_id: int
    site: str
    domain: str
    rank: int
    fingerprint: str
    num_examples: int


def whole_number(value, what: str, where: str, cap: int) -> int:
    """`value` as an int if it is a whole number in [1, cap] (an integral finite float
    counts: MetricRecord carries numbers as int or float), else a one-line FedmoeError."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        ok, value = True, int(value)
    if not ok:
        raise FedmoeError(f"{where}: {what} must be a whole number, got {shown(value)}")
    if not 1 <= value <= cap:
        raise FedmoeError(f"{where}: {what} must be between 1 and {cap}, got {value}")
    return value


def node_from_describe(node_id: int, info: dict, cfg: StrategyConfig) -> Node:
    """A node from its describe reply, every field checked (names become folders, rank
    sizes the adapter we build for it, num-examples weights its updates); a bad reply is
    a one-line FedmoeError: that site's rejection, never the run's."""
    where = f"describe reply of node {node_id}"
    for key in ("site", "domain", "rank", "fingerprint", "num-examples"):
        if key not in info:
            raise FedmoeError(f"{where}: lacks {key!r}")
    site = check_name(info["site"], "site", where)
    domain = check_name(info["domain"], "domain", f"{where} (site {site})")
    if cfg.single_expert and domain == SINGLE_EXPERT:
        raise FedmoeError(f"{where} (site {site}): domain {domain!r} is the name of the single-expert baseline")
    where = f"{where} (site {site})"
    rank = info["rank"]
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise FedmoeError(f"{where}: rank must be an integer, got {shown(rank)}")
    if not 1 <= rank <= cfg.max_rank:
        raise FedmoeError(f"{where}: rank must be between 1 and max-rank {cfg.max_rank}, got {rank}")
    fingerprint = info["fingerprint"]
    if not isinstance(fingerprint, str) or not 0 < len(fingerprint) <= 128:
        raise FedmoeError(f"{where}: fingerprint must be a short string, got {shown(fingerprint)}")
    n = whole_number(info["num-examples"], "num-examples", where, cfg.max_examples)
    return Node(node_id, site, domain, rank, fingerprint, n)


def check_metrics(metrics: dict, where: str) -> None:
    """Every number a site reports is finite: a NaN loss would poison the expert's metrics."""
    for key, value in metrics.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise DeltaValidationError(f"{where}: metric {shown(key)} is {v}")


class ShortRoundError(FedmoeError):
    """A round ended with too few accepted replies under `short_round = "fail"`."""


@dataclass
class RoundResult:
    participation: list[dict] = field(default_factory=list)
    rejections: list[dict] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


class DomainExpertStrategy:
    def __init__(self, cfg: StrategyConfig, spec: AdapterSpec, fingerprint: str, rounds: int | None = None):
        self.cfg, self.spec, self.fingerprint = cfg, spec, fingerprint
        self.rounds = rounds  # the federation's length, which the lr schedule spans (None: unknown, constant lr)
        self.nodes: dict[int, Node] = {}
        self.experts: dict[str, dict[str, LowRank]] = {}
        self._init: dict[int, LoraDelta] = {}
        from fedmoe.server.federation.privacy import PrivacyAccountant, PrivacyConfig
        from fedmoe.server.federation.robust import RobustConfig

        self.robust = RobustConfig(cfg.robust)
        self.privacy = PrivacyConfig(cfg.privacy, cfg.noise_multiplier, cfg.site_clip, cfg.dp_delta, cfg.epsilon_budget)
        self._noise_std: dict[str, float] = {}
        self.accountant = PrivacyAccountant(cfg.noise_multiplier, cfg.dp_delta) if cfg.privacy == "dp" else None
        self.server_opt = None
        if cfg.server_opt == "fedadam":
            from fedmoe.server.federation.server_optimizer import ExpertFedAdam

            self.server_opt = ExpertFedAdam(cfg.server_lr, eps=cfg.server_tau)

    # -- membership ------------------------------------------------------------
    def add_node(self, node: Node) -> str | None:
        """Register a node from its QUERY reply; returns a rejection reason or None."""
        if node.fingerprint != self.fingerprint:
            return f"base model {node.fingerprint} differs from the coordinator's {self.fingerprint}"
        self.nodes[node.node_id] = node
        return None

    def groups(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes.values():
            out.setdefault(n.domain, []).append(n)
        if self.cfg.single_expert:
            out[SINGLE_EXPERT] = list(self.nodes.values())
        return dict(sorted(out.items()))

    def max_rank(self, expert: str) -> int:
        return max(n.rank for n in self.groups()[expert])

    def init_adapter(self, rank: int) -> LoraDelta:
        if rank not in self._init:
            r_max = max(n.rank for n in self.nodes.values())
            full = initial_adapter(self.spec, max(r_max, rank), self.cfg.alpha_per_rank * rank, self.fingerprint, self.cfg.seed)
            factors = {m: (full.factors(m)[0][:rank], full.factors(m)[1][:, :rank]) for m in full.modules()}
            self._init[rank] = LoraDelta.from_factors(factors, rank, self.cfg.alpha_per_rank * rank, self.fingerprint)
        return self._init[rank]

    def expert_for_rank(self, expert: str, rank: int) -> LoraDelta:
        init = self.init_adapter(rank)
        if expert not in self.experts:
            return init
        return to_site_delta(self.experts[expert], rank, self.cfg.alpha_per_rank * rank, self.fingerprint, init)

    # -- rounds ----------------------------------------------------------------
    def sample(self, nodes: list[Node], rnd: int, expert: str) -> list[Node]:
        """Seeded by (seed, round, expert) and site names, not node ids: a resumed run
        (new node ids) samples exactly as the uninterrupted one would have."""
        k = max(self.cfg.min_nodes, round(self.cfg.fraction * len(nodes)))
        rng = random.Random(f"{self.cfg.seed}/{rnd}/{expert}")
        ordered = sorted(nodes, key=lambda n: n.site)
        return sorted(rng.sample(ordered, min(k, len(ordered))), key=lambda n: n.site)

    def train_seed(self, rnd: int, node: Node) -> int:
        return zlib.crc32(f"{self.cfg.seed}/{rnd}/{node.site}".encode()) % (2**31)

    def train_config(self, rnd: int, expert: str, node: Node) -> dict:
        """What a site needs besides the adapter to train `expert` in round `rnd`."""
        return {"compression": self.cfg.compression, "expert": expert, "round": rnd, "steps": self.cfg.local_steps,
                "batch-size": self.cfg.batch_size, "lr": self.cfg.lr, "seed": self.train_seed(rnd, node),
                "prox-mu": self.cfg.prox_mu} | self.schedule_train_config(rnd) | self.privacy_train_config()

    def schedule_train_config(self, rnd: int) -> dict:
        """Where round `rnd`'s local steps sit on the federation-wide lr schedule."""
        if self.cfg.lr_schedule == "constant" or not self.rounds:
            return {}
        steps = self.cfg.local_steps
        return {"lr-schedule": self.cfg.lr_schedule, "global-step": (rnd - 1) * steps,
                "total-steps": self.rounds * steps, "warmup": self.cfg.warmup}

    def adapters_by_rank(self, expert: str, ranks) -> dict[int, LoraDelta]:
        """The expert sliced once per distinct rank (a re-factorization each), not once per site."""
        return {r: self.expert_for_rank(expert, r) for r in sorted(set(ranks))}

    def configure_train(self, rnd: int) -> list[tuple[str, Node, Message]]:
        out = []
        for expert, nodes in self.groups().items():
            sampled = self.sample(nodes, rnd, expert)
            adapters = self.adapters_by_rank(expert, (n.rank for n in sampled))
            for node in sampled:
                delta = adapters[node.rank]
                arrays, meta, _ = compression.encode(delta, self.cfg.compression)
                config = ConfigRecord(dict(meta) | self.train_config(rnd, expert, node))
                msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node.node_id, message_type="train")
                out.append((expert, node, msg))
        return out

    def read_reply(self, node: Node, msg: Message, reply: Message | None) -> tuple[str, str | None, tuple | None]:
        """One reply, checked: ("ok", None, (delta, num_examples, metrics)), ("failed", reason, None)
        for no reply or a site error, ("rejected", reason, None) for a reply that fails validation."""
        if reply is None:
            return "failed", "no reply before the round deadline", None
        if reply.has_error():
            return "failed", f"site error: {reply.error.reason}"[:300], None
        try:
            reply_cfg = reply.content["config"]
            # A relative reply is the site's update to exactly what we sent it.
            sent_adapter = (compression.decode(msg.content["arrays"], msg.content["config"])
                            if reply_cfg.get("relative", False) else None)
            delta = compression.decode(reply.content["arrays"], reply_cfg, base=sent_adapter)
            if delta.rank != node.rank:
                raise DeltaValidationError(f"rank {delta.rank} differs from the rank {node.rank} the site announced")
            delta.validate(self.spec, self.fingerprint, self.cfg.max_update_norm, where=f"site {node.site}")
            metrics = dict(reply.content["metrics"])
            n = whole_number(metrics.get("num-examples"), "num-examples", f"site {node.site}", self.cfg.max_examples)
            check_metrics(metrics, f"site {node.site}")
        except FedmoeError as exc:
            reason = str(exc)
            return "rejected", reason if reason.startswith(f"site {node.site}") else f"site {node.site}: {reason}", None
        except KeyError as exc:
            return "rejected", f"site {node.site}: reply lacks {exc}", None
        except Exception as exc:  # noqa: BLE001 - whatever a malformed reply breaks, it is that reply's rejection
            return "rejected", f"site {node.site}: malformed reply ({type(exc).__name__}: {shown(str(exc), 200)})", None
        return "ok", None, (delta, n, metrics)

    def required_replies(self, sampled: int) -> int:
        return min(self.cfg.min_replies, sampled)

    def short_experts(self, sent: list[tuple[str, Node, Message]], status: list[str]) -> dict[str, tuple[int, int]]:
        """Experts with fewer accepted replies than required: {expert: (accepted, required)}."""
        counts: dict[str, list[int]] = {}
        for (expert, _, _), st in zip(sent, status):
            c = counts.setdefault(expert, [0, 0])
            c[0] += st == "ok"
            c[1] += 1
        return {e: (ok, self.required_replies(n)) for e, (ok, n) in counts.items() if ok < self.required_replies(n)}

    def collect_train(self, grid, rnd: int, sent: list[tuple[str, Node, Message]]) -> tuple[list[Message | None], list[int]]:
        """The replies to `sent` (None: none came) and how often each message was re-sent.

        Every attempt waits at most `round_timeout`. An expert left with fewer than
        `min_replies` accepted replies is short: under `retry` and `fail` the messages of
        its sites that did not deliver are sent again, unchanged (same adapter, same seed:
        a retried reply is the one that was lost), to those still connected, up to
        `max_retries` times; then `fail` raises ShortRoundError and the others aggregate
        what arrived. So a round lasts at most (1 + max_retries) x round_timeout."""
        replies = send_round(grid, sent, self.cfg.round_timeout, on_first_reply=lambda: fault_point("train", rnd))
        status = [self.read_reply(node, msg, r)[0] for (_, node, msg), r in zip(sent, replies)]
        resends, made = [0] * len(sent), 0
        attempts = self.cfg.max_retries if self.cfg.short_round != "proceed" else 0
        for attempt in range(1, attempts + 1):
            if not (short := self.short_experts(sent, status)):
                break
            online = set(grid.get_node_ids())
            again = [i for i, (expert, node, _) in enumerate(sent)
                     if expert in short and status[i] != "ok" and node.node_id in online]
            if not again:
                break
            made = attempt
            fresh = [(sent[i][0], sent[i][1], Message(sent[i][2].content, dst_node_id=sent[i][1].node_id,
                                                      message_type=sent[i][2].metadata.message_type)) for i in again]
            for i, reply in zip(again, send_round(grid, fresh, self.cfg.round_timeout)):
                replies[i], resends[i] = reply, attempt
                status[i] = self.read_reply(sent[i][1], sent[i][2], reply)[0]
        if self.cfg.short_round == "fail" and (short := self.short_experts(sent, status)):
            raise ShortRoundError("round {}: too few accepted replies ({}) after {} re-send(s); stopping "
                                  "(short-round fail); the committed rounds can be resumed".format(
                                      rnd, ", ".join(f"{e} {ok} of {need}" for e, (ok, need) in sorted(short.items())),
                                      made))
        return replies, resends

    def aggregate_train(self, rnd: int, sent: list[tuple[str, Node, Message]], replies: list[Message | None],
                        resends: list[int] | None = None) -> RoundResult:
        """`replies[i]` answers `sent[i]` (None: no reply by the deadline), after `resends[i]`
        re-sends (collect_train)."""
        result = RoundResult()
        accepted: dict[str, list[tuple[LoraDelta, float, dict]]] = {}
        sent_of: dict[int, tuple[Node, LoraDelta]] = {}  # id(reply delta) -> (node, adapter we sent)
        resends = resends or [0] * len(sent)
        sampled: dict[str, int] = {}
        for (expert, node, msg), reply, k in zip(sent, replies, resends):
            sampled[expert] = sampled.get(expert, 0) + 1
            bytes_out = compression.record_bytes(msg.content["arrays"]) * (1 + k)
            row = {"site": node.site, "node_id": node.node_id, "expert": expert, "bytes_out": bytes_out}
            status, reason, payload = self.read_reply(node, msg, reply)
            if k:
                reason = f"{reason} (after {k} re-send(s))" if reason else f"delivered after {k} re-send(s)"
            if status == "rejected":
                result.rejections.append({"site": node.site, "node_id": node.node_id, "expert": expert, "reason": reason})
            if status != "ok":
                result.participation.append(row | {"status": status, "reason": reason})
                continue
            delta, n, metrics = payload
            if self.privacy.mode in METRICS_WITHHELD:  # never recorded, even if a site sends it
                metrics = {k: v for k, v in metrics.items() if k not in ("train-loss", "tokens")}
            result.participation.append(row | {"status": "ok", "loss": metrics.get("train-loss"), "num_examples": n, "reason": reason,
                                               "bytes_in": compression.record_bytes(reply.content["arrays"]), "seconds": metrics.get("seconds")})
            accepted.setdefault(expert, []).append((delta, float(n), metrics))
            sent_of[id(delta)] = (node, compression.decode(msg.content["arrays"], msg.content["config"]))
        accepted = self.screen(accepted, sent_of, result)
        for i, (expert, items) in enumerate(accepted.items()):
            if i > 0:
                fault_point("aggregate", rnd)  # an expert of the round aggregated in memory, the next not yet
            updates = [(d, w) for d, w, _ in items]
            if self.privacy.frozen_a:
                if (aggregated := self.frozen_a_round(expert, items, sent_of, result)) is None:
                    continue
                self.experts[expert] = aggregated
            else:
                aggregate = self.aggregate(updates, self.max_rank(expert))
                if self.server_opt is not None:
                    aggregate = self.server_opt.step(expert, self.experts.get(expert), aggregate, self.max_rank(expert))
                self.experts[expert] = aggregate
            # Canonical state = what the checkpoint holds, so a resumed run continues bit for bit.
            self.restore(expert, self.expert_delta(expert))
            result.metrics[expert] = self._noise_metrics(expert) | train_loss_metric([(m, w) for _, w, m in items]) | {
                "sites_ok": len(items),
                "update_norm": self.expert_delta(expert).update_norm(),
            }
        if len(accepted) == 1:
            fault_point("aggregate", rnd)
        if self.accountant is not None and accepted:
            self.accountant.step(self.sample_rate(), self.steps_per_round())
            for expert in accepted:
                result.metrics[expert]["dp_epsilon"] = self.accountant.epsilon()
        for expert in self.groups():
            failed = sum(1 for p in result.participation if p["expert"] == expert and p["status"] != "ok")
            m = result.metrics.setdefault(expert, {})
            m["sites_failed"] = failed
            if n_resent := sum(k for (e, _, _), k in zip(sent, resends) if e == expert):
                m["resends"] = n_resent
            if expert in sampled and len(accepted.get(expert, [])) < self.required_replies(sampled[expert]):
                m["short_round"] = 1.0  # fewer accepted replies than min-replies: aggregated what arrived
        return result

    def aggregate(self, updates: list[tuple[LoraDelta, float]], rank: int) -> dict[str, LowRank]:
        """One expert's accepted updates combined: robust, exact or naive."""
        if self.robust.method in ("trimmed-mean", "median"):
            from fedmoe.server.federation.robust import coordinate_aggregate

            return coordinate_aggregate(updates, self.robust.method, self.robust.trim)
        if self.cfg.aggregation == "exact":
            return exact_lora_aggregate(updates, rank)
        return naive_lora_aggregate(updates)

    # -- robustness and privacy (fedmoe.server.federation.robust, fedmoe.server.federation.privacy) ----------
    def screen(self, accepted: dict, sent_of: dict, result: RoundResult) -> dict:
        """Outlier rejection / norm bounding over the round's accepted replies, all experts pooled."""
        from fedmoe.server.federation.robust import screen

        if self.robust.method == "none" or self.privacy.frozen_a:
            return accepted
        keyed = [((expert, i), d, sent_of[id(d)][1]) for expert, items in accepted.items() for i, (d, _, _) in enumerate(items)]
        verdicts = {s.key: s for s in screen(keyed, self.robust)}
        out: dict = {}
        for expert, items in accepted.items():
            for i, (d, w, m) in enumerate(items):
                v, node = verdicts[(expert, i)], sent_of[id(d)][0]
                row = next(p for p in result.participation if p["node_id"] == node.node_id and p["expert"] == expert)
                row["update_norm"] = v.norm
                if v.status == "rejected":
                    result.rejections.append({"site": node.site, "node_id": node.node_id, "expert": expert, "reason": v.reason})
                    row.update(status="rejected", reason=v.reason)
                    continue
                if v.status == "clipped":
                    row["reason"] = v.reason
                    sent_of[id(v.delta)] = sent_of[id(d)]
                out.setdefault(expert, []).append((v.delta, w, m))
        return out

    def _noise_metrics(self, expert: str) -> dict:
        std = getattr(self, "_noise_std", {}).pop(expert, None)
        return {} if std is None else {"dp_noise_std": std}

    def privacy_train_config(self) -> dict:
        """The mode, declared (a site checks it against its policy, fedmoe.client.privacy.SitePolicy),
        and what the site applies itself: frozen A, its clip; for dp the noise multiplier
        this coordinator adds, so a site can hold it to a floor."""
        if not self.privacy.frozen_a:
            return {"privacy": self.privacy.mode}
        # `dp-clip` bounds the site's update norm: in dp for the noise's sensitivity, in secagg so
        # that every coordinate lies inside SecAgg+'s clipping range (fedmoe.server.federation.secagg).
        clipped = self.privacy.mode in ("dp", "secagg")
        return ({"privacy": self.privacy.mode, "freeze-a": True} | ({"dp-clip": float(self.privacy.clip)} if clipped else {})
                | ({"dp-noise-multiplier": float(self.privacy.noise_multiplier)} if self.privacy.mode == "dp" else {}))

    def sample_rate(self) -> float:
        """The fraction of a domain's sites sampled per round (the accountant's q; at most 1)."""
        return min(1.0, max(len(self.sample(n, 0, e)) / len(n) for e, n in self.groups().items()))

    def steps_per_round(self) -> int:
        """Gaussian steps a site takes part in per round: its domain expert, plus `all` if trained."""
        return 2 if self.cfg.single_expert else 1

    def budget_stop(self, rnd: int) -> str | None:
        """Why round `rnd` must not run (its ε would exceed the budget), or None."""
        if self.accountant is None or self.privacy.epsilon_budget is None:
            return None
        eps = self.accountant.epsilon_after(self.sample_rate(), self.steps_per_round())
        if eps > self.privacy.epsilon_budget:
            return (f"privacy budget: round {rnd} would bring epsilon to {eps:.3g} > budget "
                    f"{self.privacy.epsilon_budget:g} (delta {self.privacy.delta:g}); stopping after round {rnd - 1}")
        return None

    def frozen_a_round(self, expert: str, items: list, sent_of: dict, result: RoundResult) -> dict[str, LowRank]:
        """FFA-LoRA aggregation: mean of the sites' B updates against the frozen A; in `dp`
        mode equal weights, a clip check and Gaussian noise of std z C / n."""
        from fedmoe.server.federation.privacy import b_update, frozen_a_aggregate, update_norm

        r_max = self.max_rank(expert)
        updates = []
        for d, w, _ in items:
            node, sent = sent_of[id(d)]
            try:
                u = b_update(d, sent, r_max)
                if self.privacy.mode == "dp" and update_norm(u) > self.privacy.clip * (1 + 1e-4):
                    raise DeltaValidationError(f"update norm {update_norm(u):.4g} exceeds the DP clip {self.privacy.clip:g}")
            except DeltaValidationError as exc:
                reason = f"site {node.site}: {exc}"
                result.rejections.append({"site": node.site, "node_id": node.node_id, "expert": expert, "reason": reason})
                next(p for p in result.participation if p["node_id"] == node.node_id and p["expert"] == expert).update(
                    status="rejected", reason=reason)
                continue
            updates.append((u, 1.0 if self.privacy.mode == "dp" else w))
        if not updates:
            return None
        noise_std = 0.0
        if self.privacy.mode == "dp":
            noise_std = self.privacy.noise_multiplier * self.privacy.clip / len(updates)
            self._noise_std[expert] = noise_std
        # The noise comes from the OS CSPRNG (fedmoe.shared.dp_noise), not the run seed.
        a0 = self.init_adapter(r_max)
        return frozen_a_aggregate(self.experts.get(expert), a0, updates, self.cfg.alpha_per_rank, noise_std)

    def expert_delta(self, expert: str) -> LoraDelta:
        """The expert at its largest site rank, as a LoraDelta (checkpoints, export)."""
        return self.expert_for_rank(expert, self.max_rank(expert))

    def restore(self, expert: str, delta: LoraDelta) -> None:
        """Load an expert from a checkpoint (resume)."""
        self.experts[expert] = {m: LowRank(b.float() * (delta.scaling ** 0.5), a.float() * (delta.scaling ** 0.5))
                                for m in delta.modules() for a, b in [delta.factors(m)]}


def train_loss_metric(reports: list[tuple[dict, float]]) -> dict:
    """{"train_loss": weighted mean} over the sites that reported a loss; {} if none did
    (under dp / secagg no site sends one: fedmoe.shared.privacy_modes.METRICS_WITHHELD)."""
    losses = [(m["train-loss"], w) for m, w in reports if isinstance(m.get("train-loss"), (int, float))]
    total = sum(w for _, w in losses)
    return {"train_loss": sum(v * w for v, w in losses) / total} if losses and total > 0 else {}


def send_round(grid, sent: list[tuple[str, Node, Message]], timeout: float, on_first_reply=None) -> list[Message | None]:
    """Send and collect replies until all are in or `timeout` passes; never blocks longer.
    Returns the reply (or None) for each sent message, in order. `on_first_reply()` runs
    once, when the first reply is in (a fault-injection point)."""
    ids = list(grid.push_messages([m for _, _, m in sent]))
    pending, replies = set(ids), {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            if mid in pending:
                pending.discard(mid)
                replies[mid] = reply
        if replies and on_first_reply is not None:
            on_first_reply, hook = None, on_first_reply
            hook()
        if pending:
            time.sleep(0.1)
    return [replies.get(mid) for mid in ids]
