"""The operator's web dashboard: a read-only view of one run folder's run store.

    handle = start_dashboard("runs/smoke")            # uvicorn on a background thread, 127.0.0.1, ephemeral port
    print(handle.url_with_token)                      # open this once; the page keeps the token
    handle.stop()

A Starlette app on uvicorn (asgi_server.py): one event loop, no thread per connection; a
connection that sends no request for `idle_timeout` seconds is closed, at most
`max_connections` are open, and `tls` (a certificate and key) serves HTTPS, which a
non-loopback host needs.

`RunView` turns the run store (SQLite, opened read-only for every snapshot, so a live
coordinator's writes show up as they are committed) into the plain dicts that both the
HTTP API here and the gRPC `OperatorService` (operator_service.py) serve; so the page,
`fedmoe status` and automation all see the same state.

Routes (GET only; every one needs the bearer token):
    /                     the page (static/index.html)
    /static/...           the page's JS/CSS, and plotly.min.js from the installed plotly wheel
    /api/run              overview: state, rounds, elapsed, estimated time left
    /api/rounds           per-round metrics per expert, bytes, rejections
    /api/sites            the sites table, one page: ?limit=N (default 100, at most 1000) &offset=M, by
                          site name; the X-Total-Count header carries the number of sites
    /api/experts          per-layer update norms of each expert's latest checkpoint, routing share
    /api/accuracy         per-round accuracy if recorded, else report.json's final accuracies
    /api/privacy          DP spend by round (once sites record it)
    /api/rejections       rejected updates with their reasons, one page (?limit, ?offset as for sites)
                          counted from the newest, shown oldest first; X-Total-Count: all of them
    /api/events           server-sent events: one `snapshot`, then one event per change

The token is accepted as `Authorization: Bearer T`, as the `fedmoe_token_<port>` cookie that a
page load with `?token=T` sets (EventSource and <script src> cannot send headers), or
as `?token=T` on any route. Anything else is answered 401 (`TokenGuard`, before any route).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedmoe.server.ops.access import TLSFiles, bearer, new_token, token_matches
from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.network import is_loopback_host

STATIC_DIR = Path(__file__).resolve().parent / "dashboard_static"
BASELINE_EXPERT = "all"  # strategy.SINGLE_EXPERT: the single-model FedAvg baseline, trained alongside
PRIVACY_METRICS = ("epsilon", "dp_epsilon", "dp_delta", "noise_multiplier", "clip_fraction")
ACCURACY_METRICS = ("eval_accuracy", "accuracy", "val_accuracy")
ROUTING_METRIC = "routing_share"
COOKIE = "fedmoe_token"
PAGE_LIMIT, MAX_PAGE_LIMIT = 100, 1000  # rows an API page lists unasked, and at most
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"  # as shared/delta.py (not imported: it pulls in torch)


def _num(v, default=0.0) -> float:
    return float(v) if v is not None else default


# -- the data ------------------------------------------------------------------------------------


METRIC_LABELS = {"exact_match": "exact-match accuracy", "acc_norm": "multiple-choice accuracy (acc_norm)"}


class RunView:
    """Read-only snapshots of a run folder. Safe to share between threads: every call
    opens its own read-only connection and reads inside one transaction."""

    def __init__(self, run_dir: str | Path, serving=None):
        self.run_dir = Path(run_dir)
        # `fedmoe serve`'s dashboard: a callable giving the served model's swap status
        # ({"round", "swaps", ...}), shown beside the run's own rounds.
        self.serving = serving
        self._norm_cache: dict[str, dict] = {}
        self._lock = threading.Lock()

    @contextmanager
    def _db(self):
        path = self.run_dir / "run.db"
        if not path.is_file():
            yield None
            return
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN")  # one consistent snapshot across the queries below
            yield db
        finally:
            db.close()

    def _run_info(self) -> dict:
        try:
            return json.loads((self.run_dir / "run.json").read_text())
        except (OSError, ValueError):
            return {}

    def report(self) -> dict | None:
        try:
            return json.loads((self.run_dir / "report.json").read_text())
        except (OSError, ValueError):
            return None

    # -- overview --------------------------------------------------------------------------------
    def overview(self) -> dict:
        now = time.time()
        info = self._run_info()
        out = {"run_dir": str(self.run_dir), "name": self.run_dir.name, "state": "waiting", "preset": info.get("preset", ""),
               "seed": int(info.get("seed", 0) or 0), "started": 0.0, "finished": 0.0, "elapsed_seconds": 0.0,
               "current_round": 0, "committed_rounds": 0, "total_rounds": int(info.get("rounds", 0) or 0),
               "eta_seconds": None, "experts": [], "sites": 0, "rejections": 0, "bytes_sent": 0, "bytes_received": 0}
        with self._db() as db:
            if db is None:
                return out
            run = db.execute("SELECT * FROM run").fetchone()
            if run is not None:
                config = {}
                try:
                    config = json.loads(run["config"] or "{}")
                except ValueError:
                    pass
                out.update(state=run["state"] or "unknown", preset=run["preset"] or out["preset"], seed=int(run["seed"] or 0),
                           started=_num(run["started"]), finished=_num(run["finished"]))
                out["total_rounds"] = int(config.get("rounds") or out["total_rounds"] or 0)
                end = out["finished"] or now
                out["elapsed_seconds"] = max(0.0, end - out["started"]) if out["started"] else 0.0
            rounds = [dict(r) for r in db.execute("SELECT * FROM rounds ORDER BY round")]
            committed = [r for r in rounds if r["state"] == "committed" and r["finished"]]
            out["current_round"] = max((r["round"] for r in rounds), default=0)
            out["committed_rounds"] = len(committed)
            out["experts"] = [r[0] for r in db.execute("SELECT DISTINCT expert FROM metrics ORDER BY expert")]
            out["sites"] = int(db.execute("SELECT COUNT(*) FROM sites").fetchone()[0])
            out["rejections"] = int(db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0])
            b = db.execute("SELECT COALESCE(SUM(bytes_in), 0), COALESCE(SUM(bytes_out), 0) FROM participation").fetchone()
            out["bytes_sent"], out["bytes_received"] = int(b[0]), int(b[1])
        out["eta_seconds"] = self._eta(out, rounds, committed, now)
        if self.serving is not None:
            out["serving"] = self.serving()
        return out

    @staticmethod
    def _eta(out: dict, rounds: list[dict], committed: list[dict], now: float) -> float | None:
        """Mean committed round time x rounds left, less what the round in flight has already taken."""
        if out["state"] != "running" or not committed or not out["total_rounds"]:
            return None
        mean = sum(r["finished"] - r["started"] for r in committed) / len(committed)
        in_flight = [r for r in rounds if r["state"] != "committed"]
        left = max(0, out["total_rounds"] - len(committed)) * mean
        if in_flight:
            left -= min(mean, max(0.0, now - _num(in_flight[-1]["started"], now)))
        return max(0.0, left)

    # -- rounds ----------------------------------------------------------------------------------
    def rounds(self) -> list[dict]:
        with self._db() as db:
            if db is None:
                return []
            rounds = [dict(r) for r in db.execute("SELECT * FROM rounds ORDER BY round")]
            metrics = [dict(r) for r in db.execute("SELECT * FROM metrics ORDER BY round, expert, name")]
            traffic = {r[0]: (int(r[1]), int(r[2])) for r in db.execute(
                "SELECT round, COALESCE(SUM(bytes_in), 0), COALESCE(SUM(bytes_out), 0) FROM participation GROUP BY round")}
            rejected = {r[0]: int(r[1]) for r in db.execute("SELECT round, COUNT(*) FROM rejections GROUP BY round")}
        now = time.time()
        out = []
        for r in rounds:
            experts: dict[str, dict] = {}
            for m in metrics:
                if m["round"] == r["round"]:
                    experts.setdefault(m["expert"], {})[m["name"]] = m["value"]
            started, finished = _num(r["started"]), _num(r["finished"])
            out.append({"round": r["round"], "state": r["state"], "started": started, "finished": finished,
                        "seconds": max(0.0, (finished or now) - started) if started else 0.0,
                        "experts": [{"expert": e, "metrics": experts[e]} for e in sorted(experts)],
                        "bytes_sent": traffic.get(r["round"], (0, 0))[0], "bytes_received": traffic.get(r["round"], (0, 0))[1],
                        "rejections": rejected.get(r["round"], 0)})
        return out

    def series(self, names: tuple[str, ...] | str) -> dict[str, dict[str, list]]:
        """{metric name: {expert: [[round, value], ...]}} for the given metric names."""
        names = (names,) if isinstance(names, str) else names
        out: dict[str, dict[str, list]] = {}
        with self._db() as db:
            if db is None:
                return out
            q = f"SELECT round, expert, name, value FROM metrics WHERE name IN ({','.join('?' * len(names))}) ORDER BY round"
            for r in db.execute(q, names):
                out.setdefault(r["name"], {}).setdefault(r["expert"], []).append([r["round"], r["value"]])
        return out

    # -- sites -----------------------------------------------------------------------------------
    def sites(self, limit: int | None = None, offset: int = 0) -> list[dict]:
        """The sites table by site name; `limit` rows from `offset` (None: every site)."""
        with self._db() as db:
            if db is None:
                return []
            # Sites are keyed by their identity (site name) in the run store; runs written before
            # that keyed them by Flower node id. Join on whichever the file has.
            key = "site" if "site" in _columns(db, "participation") else "node_id"
            q = f"""SELECT s.*, COUNT(DISTINCT CASE WHEN p.status = 'ok' THEN p.round END) AS rounds_joined,
                          COALESCE(SUM(CASE WHEN p.status = 'failed' THEN 1 ELSE 0 END), 0) AS failures,
                          COALESCE(SUM(p.bytes_in), 0) AS bytes_sent, COALESCE(SUM(p.bytes_out), 0) AS bytes_received
                   FROM sites s LEFT JOIN participation p ON p.{key} = s.{key} GROUP BY s.{key} ORDER BY s.site
                   LIMIT ? OFFSET ?"""
            rows = [dict(r) for r in db.execute(q, (-1 if limit is None else limit, offset))]
            # A rejection is recorded both in `rejections` and as a participation row with status
            # 'rejected'; count the rejections table, which every rejection reaches.
            rkey = key if key in _columns(db, "rejections") else "node_id"
            wanted = [str(r[rkey]) for r in rows]
            rejected = {str(r[0]): int(r[1]) for r in db.execute(
                f"SELECT {rkey}, COUNT(*) FROM rejections WHERE {rkey} IN (SELECT value FROM json_each(?)) GROUP BY {rkey}",
                (json.dumps(wanted),))}
        return [{"node_id": str(r["node_id"]), "site": r["site"] or "", "domain": r["domain"] or "", "rank": int(r["rank"] or 0),
                 "fingerprint": r["fingerprint"] or "", "num_examples": int(r["num_examples"] or 0),
                 "first_seen": _num(r["first_seen"]), "last_seen": _num(r["last_seen"]),
                 "rounds_joined": int(r["rounds_joined"] or 0), "failures": int(r["failures"] or 0),
                 "rejections": rejected.get(str(r[rkey]), 0),
                 "bytes_sent": int(r["bytes_sent"] or 0), "bytes_received": int(r["bytes_received"] or 0)} for r in rows]

    def rejections(self, limit: int | None = None, offset: int = 0) -> list[dict]:
        """Rejected updates oldest first; `limit` of them, `offset` counted back from the newest
        (None: every one)."""
        with self._db() as db:
            if db is None:
                return []
            rows = db.execute("SELECT * FROM rejections ORDER BY round DESC, rowid DESC LIMIT ? OFFSET ?",
                              (-1 if limit is None else limit, offset))
            return [dict(r) for r in rows][::-1]

    def count(self, table: str) -> int:
        """Rows of the run store's `sites` or `rejections` table (an API page's X-Total-Count)."""
        assert table in ("sites", "rejections")
        with self._db() as db:
            return 0 if db is None else int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    # -- experts ---------------------------------------------------------------------------------
    def experts(self) -> dict:
        """Per-layer ||s B A||_F of each expert's latest checkpoint (trace trick, no dense
        matrix), the aggregate update norm by round, and the gate's routing share if any."""
        with self._db() as db:
            if db is None:
                return {"experts": [], "layers": [], "update_norm": {}, "routing_share": None}
            latest = [dict(r) for r in db.execute(
                "SELECT c.expert, c.round, c.path, c.sha256 FROM checkpoints c JOIN "
                "(SELECT expert, MAX(round) AS round FROM checkpoints GROUP BY expert) m "
                "ON m.expert = c.expert AND m.round = c.round ORDER BY c.expert")]
        experts = []
        for row in latest:
            item = {"expert": row["expert"], "round": row["round"], "baseline": row["expert"] == BASELINE_EXPERT}
            try:
                item.update(self._norms(row))
            except Exception as exc:  # a missing/corrupt checkpoint is shown, not fatal to the page
                item.update(error=str(exc).splitlines()[0][:300], modules={}, layers={}, total_norm=None)
            experts.append(item)
        layers = sorted({k for e in experts for k in e.get("layers", {})}, key=_layer_sort_key)
        return {"experts": experts, "layers": layers, "update_norm": self.series("update_norm").get("update_norm", {}),
                "routing_share": self._routing_share()}

    def _norms(self, row: dict) -> dict:
        with self._lock:
            hit = self._norm_cache.get(row["sha256"])
        if hit is not None:
            return hit
        from fedmoe.server.federation.run_store import file_sha256

        path = self.run_dir / row["path"]
        if not path.is_file() or file_sha256(path) != row["sha256"]:
            raise FedmoeError(f"checkpoint {path} is missing or corrupt (sha256 mismatch)")
        result = checkpoint_norms(path)
        with self._lock:
            self._norm_cache[row["sha256"]] = result
        return result

    def _routing_share(self) -> dict | None:
        share = self.series(ROUTING_METRIC).get(ROUTING_METRIC)
        if share:
            return {e: pts[-1][1] for e, pts in share.items()}
        for method in ((self.report() or {}).get("methods") or {}).values():
            if isinstance(method, dict) and isinstance(method.get("routing_share"), dict):
                return method["routing_share"]
        return None

    # -- accuracy, privacy -----------------------------------------------------------------------
    def accuracy(self) -> dict:
        per_round = {}
        for name, by_expert in self.series(ACCURACY_METRICS).items():
            per_round = by_expert
            break
        report = self.report() or {}
        final = {m: v.get("per_domain", {}) | {"mixed": v.get("mixed")} for m, v in (report.get("methods") or {}).items()
                 if isinstance(v, dict)}
        if per_round:
            note = ("per round: each expert on its sites' eval splits (example-weighted)"
                    + ("; below, final accuracies from report.json" if final else ""))
        else:
            note = "per-round accuracy is not recorded in the run store; " + ("final accuracies from report.json" if final else "no report.json yet")
        # the report's headline (acc_norm on a multiple-choice suite, else exact match); the
        # sites' per-round scores use the same one (report.json curves_metric)
        metric = report.get("metric") or "exact_match"
        return {"per_round": per_round or None, "final": final or None, "note": note,
                "metric": METRIC_LABELS.get(metric, metric)}

    def privacy(self) -> dict:
        series = self.series(PRIVACY_METRICS)
        return {"enabled": bool(series), "series": series}

    # -- change detection ------------------------------------------------------------------------
    def digest(self) -> dict:
        """Cheap fingerprint of what the page shows; polled by the event stream."""
        with self._db() as db:
            if db is None:
                return {"exists": False}
            run = db.execute("SELECT state, finished FROM run").fetchone()
            rounds = [tuple(r) for r in db.execute("SELECT round, state FROM rounds ORDER BY round")]
            sites = db.execute("SELECT COUNT(*), COALESCE(MAX(last_seen), 0) FROM sites").fetchone()
            rejections = int(db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0])
        out = {"exists": True, "state": run["state"] if run else "waiting", "rounds": rounds,
               "sites": tuple(sites), "rejections": rejections}
        if self.serving is not None:
            out["served_round"] = self.serving().get("round")
        return out


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def _layer_key(module: str) -> str:
    """`...layers.3.self_attn.q_proj` -> `3`; modules outside numbered blocks keep their name."""
    m = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", "." + module) or re.search(r"\.(\d+)\.", "." + module)
    return m.group(1) if m else module


def _layer_sort_key(key: str):
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def module_norms(tensors: dict, rank: int, alpha: float) -> dict:
    """||s B A||_F per module = s sqrt(trace((B^T B)(A A^T))), per layer (root of the sum of
    squares over the layer's modules) and in total; never forms B @ A. numpy, so the
    dashboard does not import torch."""
    import numpy as np

    scaling = alpha / rank
    modules, layers = {}, {}
    for key in sorted(tensors):
        if not key.endswith(A_SUFFIX) or key[: -len(A_SUFFIX)] + B_SUFFIX not in tensors:
            continue
        m = key[: -len(A_SUFFIX)]
        a = np.asarray(tensors[key], dtype=np.float64)
        b = np.asarray(tensors[m + B_SUFFIX], dtype=np.float64)
        sq = max(0.0, float(np.trace((b.T @ b) @ (a @ a.T)))) * scaling**2
        modules[m] = math.sqrt(sq)
        layer = _layer_key(m)
        layers[layer] = layers.get(layer, 0.0) + sq
    return {"modules": modules, "layers": {k: math.sqrt(v) for k, v in layers.items()},
            "total_norm": math.sqrt(sum(v * v for v in modules.values())), "rank": rank, "alpha": alpha}


def checkpoint_norms(path: Path) -> dict:
    """module_norms of a LoraDelta safetensors file (shared/delta.py's format)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # bfloat16 has no numpy dtype: take the torch path
        from fedmoe.shared.delta import LoraDelta

        delta = LoraDelta.load(path)
        return module_norms({k: v.double().numpy() for k, v in delta.tensors.items()}, delta.rank, delta.alpha)
    try:
        return module_norms(tensors, int(meta["rank"]), float(meta["alpha"]))
    except KeyError as exc:
        raise FedmoeError(f"{path}: safetensors metadata lacks {exc.args[0]!r}") from None


def diff_events(old: dict | None, new: dict) -> list[dict]:
    """Events between two digests (see RunView.digest)."""
    now = time.time()
    if old is None:
        return []
    events = []
    if new.get("state") != old.get("state"):
        events.append({"kind": "run_state", "time": now, "round": 0, "state": new.get("state"),
                       "message": f"run {new.get('state')}"})
    before = dict(old.get("rounds", []))
    for rnd, state in new.get("rounds", []):
        if rnd not in before:
            events.append({"kind": "round_started", "time": now, "round": rnd, "message": f"round {rnd} started"})
        if state == "committed" and before.get(rnd) != "committed":
            events.append({"kind": "round_committed", "time": now, "round": rnd, "message": f"round {rnd} committed"})
    if new.get("rejections", 0) > old.get("rejections", 0):
        n = new["rejections"] - old.get("rejections", 0)
        events.append({"kind": "rejection", "time": now, "round": max((r for r, _ in new.get("rounds", [])), default=0),
                       "message": f"{n} update(s) rejected"})
    if new.get("served_round") != old.get("served_round"):
        events.append({"kind": "served_round", "time": now, "round": new.get("served_round") or 0,
                       "message": f"serving round {new.get('served_round')}"})
    if new.get("sites") != old.get("sites"):
        events.append({"kind": "sites", "time": now, "round": 0, "message": f"{(new.get('sites') or (0,))[0]} sites"})
    return events


class EventFeed:
    """The event stream of one watcher: `start()` gives the `snapshot` event (the overview),
    then each `poll()` the change events since the previous one, or [None] when `heartbeat`
    seconds passed without any (so a writer can find out that its client is gone).
    Blocking (SQLite): a thread calls it, or an event loop through a worker thread."""

    def __init__(self, view: RunView, heartbeat: float = 15.0):
        self.view, self.heartbeat = view, heartbeat
        self._last: dict = {}
        self._quiet = time.monotonic()

    def start(self) -> dict:
        overview = self.view.overview()
        self._last = self.view.digest()
        self._quiet = time.monotonic()
        return {"kind": "snapshot", "time": time.time(), "round": overview["current_round"],
                "message": f"{overview['state']}: round {overview['current_round']}/{overview['total_rounds'] or '?'}",
                "overview": overview}

    def poll(self) -> list[dict | None]:
        try:
            now = self.view.digest()
        except sqlite3.Error:
            return []  # e.g. the writer is mid-checkpoint; try again next tick
        events: list[dict | None] = list(diff_events(self._last, now))
        if not self._last.get("exists") and now.get("exists"):
            events.insert(0, {"kind": "run_state", "time": time.time(), "round": 0, "state": now.get("state"),
                              "message": f"run {now.get('state')}"})
        self._last = now
        if events:
            self._quiet = time.monotonic()
        elif time.monotonic() - self._quiet >= self.heartbeat:
            self._quiet = time.monotonic()
            events.append(None)
        return events


def watch_events(view: RunView, stop: threading.Event, interval: float = 0.5, heartbeat: float = 15.0):
    """Yield a `snapshot` event (the overview), then change events as the run store moves;
    yields None every `heartbeat` seconds without change so callers can detect a gone client."""
    feed = EventFeed(view, heartbeat)
    yield feed.start()
    while not stop.wait(interval):
        yield from feed.poll()


# -- HTTP (Starlette on uvicorn: see asgi_server.py for the bounds) ---------------------------------

SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", b"default-src 'self'; style-src 'self' 'unsafe-inline'; "
                     b"img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'")]
REFUSAL_PAGE = (b"<!doctype html><html><head><meta charset='utf-8'><title>401 Unauthorized</title></head><body>"
                b"<h1 id='refused'>401 Unauthorized</h1><p>This fedmoe dashboard needs its access token. "
                b"Open the address printed when the dashboard started (it ends in <code>?token=...</code>).</p>"
                b"</body></html>")


def plotly_js() -> Path:
    """plotly.min.js from the installed plotly wheel (a project dependency): served locally."""
    try:
        import plotly
    except ImportError:
        raise FedmoeError("the dashboard needs the plotly package (pip install plotly)") from None
    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FedmoeError(f"plotly is installed but {path} is missing")
    return path


def page_args(query) -> tuple[int, int]:
    """(limit, offset) from a query string ({name: [values]}, or Starlette's QueryParams):
    whole numbers, limit 1..MAX_PAGE_LIMIT."""
    out = []
    for name, default, low in (("limit", PAGE_LIMIT, 1), ("offset", 0, 0)):
        values = query.getlist(name) if hasattr(query, "getlist") else query.get(name)
        raw = (values or [str(default)])[-1]
        if not raw.isdigit() or int(raw) < low or (name == "limit" and int(raw) > MAX_PAGE_LIMIT):
            bound = f"between 1 and {MAX_PAGE_LIMIT}" if name == "limit" else "a whole number >= 0"
            raise FedmoeError(f"?{name} must be {bound}, got {raw[:40]!r}")
        out.append(int(raw))
    return out[0], out[1]


def _clean(obj):
    """JSON has no NaN/inf: send null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _json(obj, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(_clean(obj), default=str, allow_nan=False), status, headers, "application/json")


class TokenGuard:
    """ASGI middleware in front of every route: the bearer token (401 without it; a
    readable page for a browser), read-only (405 for other verbs, with the token), the
    security headers on every answer, and the token cookie when it came in the query."""

    def __init__(self, app, dashboard: "Dashboard"):
        self.app, self.dash = app, dashboard

    def authorized(self, conn) -> tuple[bool, bool]:
        """(authorized, came from the query string)."""
        token = self.dash.token
        if token_matches(bearer(conn.headers.get("authorization")), token):
            return True, False
        if token_matches(conn.cookies.get(self.dash.cookie_name), token):
            return True, False
        return token_matches(conn.query_params.get("token"), token), True

    async def __call__(self, scope, receive, send):
        from starlette.requests import HTTPConnection
        from starlette.responses import Response

        if scope["type"] != "http":  # no websockets here (uvicorn runs with lifespan off)
            return
        conn = HTTPConnection(scope)
        ok, via_query = self.authorized(conn)
        extra = list(SECURITY_HEADERS)
        if ok and via_query:
            # Keep the token in an HttpOnly cookie so the page's EventSource and <script> loads carry it.
            cookie = f"{self.dash.cookie_name}={self.dash.token}; HttpOnly; SameSite=Strict; Path=/"
            extra.append((b"set-cookie", (cookie + ("; Secure" if self.dash.tls else "")).encode()))

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"cache-control" for k, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                message = message | {"headers": headers + extra}
            await send(message)

        if not ok:
            challenge = {"WWW-Authenticate": 'Bearer realm="fedmoe"'}
            if "text/html" in conn.headers.get("accept", "") and not conn.url.path.startswith("/api/"):
                response = Response(REFUSAL_PAGE, 401, challenge, "text/html; charset=utf-8")
            else:
                response = _json({"error": "unauthorized: send Authorization: Bearer <token>"}, 401, challenge)
            return await response(scope, receive, send_with_headers)
        if scope["method"] not in ("GET", "HEAD"):
            response = _json({"error": "the dashboard is read-only"}, 405, {"Allow": "GET, HEAD"})
            return await response(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


def build_app(dash: "Dashboard"):
    """The dashboard's Starlette app (routes: see the module docstring)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import FileResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    view = dash.view
    plotly = plotly_js()

    def page(request):
        return FileResponse(STATIC_DIR / "index.html")

    def plotly_file(request):
        return FileResponse(plotly, media_type="text/javascript; charset=utf-8",
                            headers={"Cache-Control": "private, max-age=3600"})

    def answer(fn):
        """A JSON route over RunView (run on Starlette's worker threads: SQLite blocks)."""
        def endpoint(request):
            try:
                body, headers = fn(request)
            except FedmoeError as exc:
                return _json({"error": str(exc)}, 400)
            except Exception as exc:  # a half-written run store is reported, not a stack trace on stderr
                return _json({"error": f"{type(exc).__name__}: {exc}"}, 500)
            return _json(body, headers=headers)
        return endpoint

    def paged(rows, table: str):
        def fn(request):
            limit, offset = page_args(request.query_params)
            return rows(limit, offset), {"X-Total-Count": str(view.count(table))}
        return answer(fn)

    plain = {"run": view.overview, "rounds": view.rounds, "experts": view.experts, "accuracy": view.accuracy,
             "privacy": view.privacy, "loss": lambda: view.series("train_loss").get("train_loss", {})}

    async def events(request):
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        if request.method == "HEAD":
            return Response(b"", headers=headers)
        return StreamingResponse(_event_stream(dash), headers=headers)

    async def not_found(request, exc: HTTPException):
        detail = f"not found: {request.url.path}" if exc.status_code == 404 else exc.detail
        return _json({"error": detail}, exc.status_code, exc.headers)

    routes = [Route("/", page), Route("/index.html", page), Route("/favicon.ico", lambda request: Response(status_code=204)),
              Route("/static/plotly.min.js", plotly_file), Mount("/static", StaticFiles(directory=STATIC_DIR)),
              Route("/api/events", events),
              Route("/api/sites", paged(view.sites, "sites")), Route("/api/rejections", paged(view.rejections, "rejections"))]
    routes += [Route(f"/api/{name}", answer(lambda request, fn=fn: (fn(), {}))) for name, fn in plain.items()]
    return Starlette(routes=routes, middleware=[Middleware(TokenGuard, dashboard=dash)],
                     exception_handlers={HTTPException: not_found})


async def _event_stream(dash: "Dashboard"):
    """Server-sent events: `retry`, the snapshot, then the run's changes, until the client
    leaves or the dashboard stops. The loop waits on the event loop; only the SQLite reads
    take a worker thread, for as long as they last."""
    from starlette.concurrency import run_in_threadpool

    def frame(event: dict | None) -> bytes:
        if event is None:
            return b": keep-alive\n\n"
        data = json.dumps(_clean(event), default=str, allow_nan=False)
        return f"event: {event['kind']}\ndata: {data}\n\n".encode()

    feed = EventFeed(dash.view)
    yield b"retry: 2000\n\n"
    yield frame(await run_in_threadpool(feed.start))
    while not dash.stopping.is_set():
        await asyncio.sleep(dash.poll_interval)
        for event in await run_in_threadpool(feed.poll):
            yield frame(event)


@dataclass
class Dashboard:
    """A running dashboard: `url`, `url_with_token`, `token`, `stop()`; a context manager."""

    view: RunView
    token: str
    host: str
    port: int
    poll_interval: float = 0.5
    tls: TLSFiles | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    _server: object | None = None  # asgi_server.AsgiServer

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    @property
    def cookie_name(self) -> str:
        # Cookies are not scoped by port: one name per dashboard, so two on one host do not clash.
        return f"{COOKIE}_{self.port}"

    @property
    def url_with_token(self) -> str:
        return f"{self.url}?token={self.token}"

    def stop(self) -> None:
        self.stopping.set()  # event streams end within one poll interval
        if self._server is not None:
            self._server.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_dashboard(run_dir: str | Path, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                    poll_interval: float = 0.5, tls: TLSFiles | None = None, idle_timeout: float = 10.0,
                    max_connections: int = 64, serving=None) -> Dashboard:
    """Serve the dashboard for `run_dir` (finished or live) from a background thread
    (uvicorn). `port=0` picks a free port; `token=None` generates one (read it from the
    handle); `tls` serves HTTPS, and a non-loopback `host` needs it. A connection idle for
    `idle_timeout` seconds is closed; at most `max_connections` are served (503 beyond).
    `serving` (fedmoe serve): a callable giving the served model's swap status, shown as
    the round the model serves."""
    from fedmoe.server.ops.asgi_server import AsgiServer

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FedmoeError(f"run folder is not a directory: {run_dir}")
    if token is not None and not token.strip():
        raise FedmoeError("dashboard token must not be empty")
    if tls is None and not is_loopback_host(host):
        raise FedmoeError(f"dashboard host {host} is not loopback: it needs TLS (the token must not travel in the clear)")
    dash = Dashboard(RunView(run_dir, serving), token or new_token(), host, port, poll_interval, tls)
    app = build_app(dash)  # finds plotly.min.js now, not on the first page load
    dash._server = AsgiServer(app, host, port, tls=tls, idle_timeout=idle_timeout, max_connections=max_connections,
                              name="fedmoe-dashboard", what="dashboard")
    dash.port = dash._server.port
    # Warm the per-layer norm cache so the first page load does not wait for it.
    threading.Thread(target=_warm, args=(dash.view,), name="fedmoe-dashboard-warm", daemon=True).start()
    return dash


def _warm(view: RunView) -> None:
    try:
        view.experts()
    except Exception:
        pass  # the API call reports it
