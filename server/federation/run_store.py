"""`RunStore`: the coordinator's record of a run, in SQLite plus safetensors files.

Every round is committed (one transaction, after its expert checkpoints are written
and renamed into place) before the next round starts, so a crash loses at most the
round in flight. Readers (dashboard, `fedmoe status`) open the same file read-only.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

from fedmoe.server.federation.faults import fault_point
from fedmoe.shared.delta import LoraDelta
from fedmoe.shared.names import inside

SCHEMA = """
CREATE TABLE IF NOT EXISTS run (id INTEGER PRIMARY KEY CHECK (id = 1), started REAL, finished REAL,
    state TEXT, preset TEXT, seed INTEGER, config TEXT);
CREATE TABLE IF NOT EXISTS sites (site TEXT PRIMARY KEY, node_id TEXT, domain TEXT, rank INTEGER,
    fingerprint TEXT, num_examples INTEGER, first_seen REAL, last_seen REAL);
CREATE TABLE IF NOT EXISTS rounds (round INTEGER PRIMARY KEY, started REAL, finished REAL, state TEXT);
CREATE TABLE IF NOT EXISTS participation (round INTEGER, site TEXT, node_id TEXT, expert TEXT, status TEXT,
    loss REAL, num_examples INTEGER, bytes_in INTEGER, bytes_out INTEGER, seconds REAL, reason TEXT);
CREATE TABLE IF NOT EXISTS metrics (round INTEGER, expert TEXT, name TEXT, value REAL);
CREATE TABLE IF NOT EXISTS rejections (round INTEGER, site TEXT, node_id TEXT, expert TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS checkpoints (round INTEGER, expert TEXT, path TEXT, sha256 TEXT,
    PRIMARY KEY (round, expert));
"""

# The per-site and per-round reads (dashboard sites table, `fedmoe status`, round pages,
# resume's discard_after) stay index lookups at thousands of sites x rounds.
INDEXES = """
CREATE INDEX IF NOT EXISTS participation_by_round ON participation (round, site);
CREATE INDEX IF NOT EXISTS participation_by_site ON participation (site, round);
CREATE INDEX IF NOT EXISTS metrics_by_round ON metrics (round, expert);
CREATE INDEX IF NOT EXISTS metrics_by_name ON metrics (name, round);
CREATE INDEX IF NOT EXISTS rejections_by_round ON rejections (round);
CREATE INDEX IF NOT EXISTS rejections_by_site ON rejections (site);
"""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunStore:
    def __init__(self, run_dir: str | Path, readonly: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "run.db"
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA + INDEXES)  # IF NOT EXISTS: an older run.db gains them on open
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    # -- writes ----------------------------------------------------------------
    def start_run(self, preset: str, seed: int, config: dict) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO run VALUES (1, ?, NULL, 'running', ?, ?, ?)",
                            (time.time(), preset, seed, json.dumps(config, default=str)))

    def finish_run(self, state: str = "finished") -> None:
        with self.db:
            self.db.execute("UPDATE run SET finished = ?, state = ?", (time.time(), state))

    def upsert_site(self, node_id, site: str, domain: str, rank: int, fingerprint: str, num_examples: int) -> None:
        """Sites are keyed by their registered identity (site name): a site that comes back
        with a new Flower node id is the same site."""
        now = time.time()
        with self.db:
            self.db.execute(
                "INSERT INTO sites VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(site) DO UPDATE SET "
                "node_id=excluded.node_id, domain=excluded.domain, rank=excluded.rank, fingerprint=excluded.fingerprint, "
                "num_examples=excluded.num_examples, last_seen=excluded.last_seen",
                (site, str(node_id), domain, rank, fingerprint, num_examples, now, now))

    def reject_site(self, node_id, reason: str) -> None:
        """A node refused before round 1 (its describe reply failed a check): a round-0
        rejection, under its node id (the names it sent are not trusted, not even to store)."""
        with self.db:
            self.db.execute("INSERT INTO rejections VALUES (0, ?, ?, ?, ?)", (f"node {node_id}", str(node_id), "describe", reason))

    def touch_site(self, site: str) -> None:
        with self.db:
            self.db.execute("UPDATE sites SET last_seen = ? WHERE site = ?", (time.time(), site))

    def begin_round(self, rnd: int) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO rounds VALUES (?, ?, NULL, 'running')", (rnd, time.time()))

    def commit_round(self, rnd: int, participation: list[dict], metrics: dict[str, dict[str, float]],
                     rejections: list[dict], experts: dict[str, LoraDelta]) -> None:
        """Write expert checkpoints (write-then-rename), then record the round in one transaction."""
        ckpt_dir = self.run_dir / "checkpoints" / f"round-{rnd:04d}"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        for i, (name, delta) in enumerate(experts.items()):
            path = inside(self.run_dir, ckpt_dir / f"{name}.safetensors", "checkpoint")
            delta.save(path, before_rename=(lambda: fault_point("checkpoint", rnd)) if i == 0 else None)
            files[name] = (str(path.relative_to(self.run_dir)), file_sha256(path))
        fault_point("commit", rnd)
        with self.db:
            self.db.executemany(
                "INSERT INTO participation VALUES (:round, :site, :node_id, :expert, :status, :loss, :num_examples, "
                ":bytes_in, :bytes_out, :seconds, :reason)",
                [{"round": rnd, "loss": None, "num_examples": 0, "bytes_in": 0, "bytes_out": 0, "seconds": None,
                  "reason": None} | p | {"node_id": str(p["node_id"])} for p in participation])
            self.db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?)",
                                [(rnd, e, k, float(v)) for e, m in metrics.items() for k, v in m.items()])
            self.db.executemany("INSERT INTO rejections VALUES (?, ?, ?, ?, ?)",
                                [(rnd, r.get("site"), str(r["node_id"]), r["expert"], r["reason"]) for r in rejections])
            self.db.executemany("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
                                [(rnd, e, p, s) for e, (p, s) in files.items()])
            self.db.execute("UPDATE rounds SET finished = ?, state = 'committed' WHERE round = ?", (time.time(), rnd))

    # -- reads -----------------------------------------------------------------
    def run(self) -> dict:
        row = self.db.execute("SELECT * FROM run").fetchone()
        return dict(row) if row else {}

    def rounds(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM rounds ORDER BY round")]

    def last_committed_round(self) -> int:
        row = self.db.execute("SELECT MAX(round) FROM rounds WHERE state = 'committed'").fetchone()
        return int(row[0] or 0)

    def sites(self) -> list[dict]:
        q = """SELECT s.*, COUNT(DISTINCT CASE WHEN p.status = 'ok' THEN p.round END) AS rounds_joined,
                      SUM(CASE WHEN p.status = 'failed' THEN 1 ELSE 0 END) AS failures,
                      SUM(CASE WHEN p.status = 'rejected' THEN 1 ELSE 0 END) AS rejections,
                      COALESCE(SUM(p.bytes_in), 0) AS bytes_sent, COALESCE(SUM(p.bytes_out), 0) AS bytes_received
               FROM sites s LEFT JOIN participation p ON p.site = s.site GROUP BY s.site ORDER BY s.site"""
        return [dict(r) for r in self.db.execute(q)]

    def metrics(self, name: str | None = None) -> list[dict]:
        q, args = "SELECT * FROM metrics", ()
        if name:
            q, args = q + " WHERE name = ?", (name,)
        return [dict(r) for r in self.db.execute(q + " ORDER BY round, expert", args)]

    def participation(self, rnd: int | None = None) -> list[dict]:
        q, args = "SELECT * FROM participation", ()
        if rnd is not None:
            q, args = q + " WHERE round = ?", (rnd,)
        return [dict(r) for r in self.db.execute(q + " ORDER BY round, site", args)]

    def rejections(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM rejections ORDER BY round")]

    def discard_after(self, rnd: int) -> None:
        """Forget every round after `rnd` (an uncommitted or corrupt one) in one transaction,
        so a resumed run neither loses nor double-counts a round."""
        with self.db:
            for table in ("participation", "metrics", "rejections", "checkpoints", "rounds"):
                self.db.execute(f"DELETE FROM {table} WHERE round > ?", (rnd,))
            self.db.execute("UPDATE run SET state = 'running', finished = NULL")

    def verified_round(self) -> tuple[int, list[str], list[str]]:
        """The newest committed round whose expert checkpoints all pass their checksum,
        the experts checkpointed then, and one line per corrupt checkpoint found on the way."""
        problems = []
        for rnd in range(self.last_committed_round(), 0, -1):
            rows = self.db.execute("SELECT expert, path, sha256 FROM checkpoints WHERE round = ?", (rnd,)).fetchall()
            bad = [f"checkpoint {self.run_dir / r['path']} (expert {r['expert']!r}, round {rnd}) is missing or corrupt "
                   f"(sha256 mismatch); using an earlier round"
                   for r in rows if not (self.run_dir / r["path"]).is_file() or file_sha256(self.run_dir / r["path"]) != r["sha256"]]
            if not bad:
                return rnd, [r["expert"] for r in rows], problems
            problems += bad
        return 0, [], problems

    def checkpoint(self, expert: str, rnd: int | None = None) -> LoraDelta:
        """An expert's checkpoint (latest committed unless `rnd`), checked against its recorded sha256."""
        from fedmoe.shared.errors import FedmoeError

        q = "SELECT * FROM checkpoints WHERE expert = ?" + (" AND round = ?" if rnd else "") + " ORDER BY round DESC LIMIT 1"
        row = self.db.execute(q, (expert, rnd) if rnd else (expert,)).fetchone()
        if row is None:
            raise FedmoeError(f"no checkpoint of expert {expert!r} in {self.path}")
        path = self.run_dir / row["path"]
        if not path.is_file() or file_sha256(path) != row["sha256"]:
            raise FedmoeError(f"checkpoint {path} is missing or corrupt (sha256 mismatch)")
        return LoraDelta.load(path)
