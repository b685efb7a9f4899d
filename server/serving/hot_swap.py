"""Hot swap: `fedmoe serve` on a live run follows the run's committed rounds.

A `RoundWatcher` thread opens `run.db` read-only every `interval` seconds. When a round
newer than the served one is committed, it reads that round's expert checkpoints
(each checked against the sha256 recorded in SQLite; a mismatch refuses the whole round,
logged in one line, and the old round keeps serving), builds the new adapter factors
off the decoding thread (`ServedModel.prepare_swap`) and stages them: they are copied
into the served peft adapters in place when no decoder holds the model, i.e. between
batches (see `ServedModel.hold`). A newly committed round that fails is not retried;
the next good one is taken. An expert that appears mid-run (a domain not served) is
logged once: serving it needs a restart.

`checkpointed_experts` gives the experts of a run that has no `experts/` yet (a
federation still running): those of its newest verified round.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from fedmoe.shared.errors import FedmoeError

DEFAULT_INTERVAL = 2.0  # seconds between polls of run.db on a run that is not finished


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _not_domain(name: str) -> bool:
    from fedmoe.server.federation.strategy import SINGLE_EXPERT

    return name == SINGLE_EXPERT  # the fedavg_single baseline is checkpointed too; it is not a served expert


def run_state(run_dir: str | Path) -> tuple[str | None, int]:
    """(run state, last committed round) from run.db; (None, 0) for a run without one."""
    from fedmoe.server.federation.run_store import RunStore

    if not (Path(run_dir) / "run.db").is_file():
        return None, 0
    store = RunStore(run_dir, readonly=True)
    try:
        return store.run().get("state"), store.last_committed_round()
    finally:
        store.close()


def checkpointed_experts(run_dir: str | Path, log=_stderr) -> tuple[int, dict]:
    """(round, {expert: LoraDelta}) of the newest committed round whose checkpoints all
    verify; (0, {}) if none does. Corrupt rounds skipped on the way are logged."""
    from fedmoe.server.federation.run_store import RunStore
    from fedmoe.shared.names import check_name

    if not (Path(run_dir) / "run.db").is_file():
        return 0, {}
    store = RunStore(run_dir, readonly=True)
    try:
        rnd, names, problems = store.verified_round()
        for line in problems:
            log(line)
        names = [check_name(n, "expert", f"{store.path} round {rnd}") for n in names if not _not_domain(n)]
        return rnd, {n: store.checkpoint(n, rnd) for n in sorted(names)}
    finally:
        store.close()


class RoundWatcher:
    """Polls run.db and stages each newly committed, verified round into `served`."""

    def __init__(self, served, run_dir: str | Path, interval: float = DEFAULT_INTERVAL, log=_stderr, start: bool = True):
        """`start=False`: no thread; the caller calls `poll()` (tests)."""
        if interval <= 0:
            raise FedmoeError(f"reload interval must be > 0 seconds, got {interval}")
        self.served, self.run_dir, self.interval, self.log = served, Path(run_dir), float(interval), log
        self.refused: dict[int, str] = {}
        self.told: set[str] = set()  # new experts already logged
        self.polls = 0
        self._stop = threading.Event()
        served.watch = {"watching": True, "reload_interval": self.interval, "run_state": None,
                        "latest_committed_round": None, "refused_rounds": {}}
        self._thread = threading.Thread(target=self._loop, name="fedmoe-round-watcher", daemon=True)
        if start:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.served.watch["watching"] = False

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.poll() == "finished":
                    break
            except Exception as exc:  # run.db locked, being replaced...: try again next time
                self.log(f"hot swap: cannot read {self.run_dir / 'run.db'}: {type(exc).__name__}: {str(exc)[:200]}")
            self._stop.wait(self.interval)
        self.served.watch["watching"] = False

    def _current(self) -> int:
        pending = self.served._pending
        return max(self.served.round or 0, pending.round if pending is not None else 0)

    def poll(self) -> str:
        """One look at run.db: "staged" (a newer round handed to the model), "refused",
        "idle", or "finished" (the run is finished and its last round served: stop)."""
        from fedmoe.server.federation.run_store import RunStore

        store = RunStore(self.run_dir, readonly=True)
        try:
            state, latest = store.run().get("state"), store.last_committed_round()
            self.polls += 1
            self.served.watch.update(run_state=state, latest_committed_round=latest, last_poll=time.time())
            current, outcome = self._current(), "idle"
            for rnd in range(latest, current, -1):  # the newest round that verifies
                if rnd in self.refused:
                    continue
                try:
                    swap = self._prepare(store, rnd)
                except Exception as exc:  # a corrupt checkpoint, a shape that needs a restart
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    self.refused[rnd] = reason
                    self.served.watch["refused_rounds"] = {str(k): v for k, v in sorted(self.refused.items())}
                    self.log(f"hot swap: round {rnd} refused, still serving round {current or '-'}: {reason}")
                    outcome = "refused"
                    continue
                now = self.served.stage_swap(swap)
                self.log(f"hot swap: serving round {rnd}" if now else
                         f"hot swap: round {rnd} ready; swapped in when the batch in flight ends")
                return "staged"
            if state == "finished":  # every newer round was tried above: nothing more will come
                self.log(f"hot swap: run finished; serving round {self.served.round or '-'}, watcher stops")
                return "finished"
            return outcome
        finally:
            store.close()

    def _prepare(self, store, rnd: int):
        names = [r["expert"] for r in store.db.execute("SELECT expert FROM checkpoints WHERE round = ?", (rnd,))]
        for name in names:
            if name not in self.served.experts and not _not_domain(name) and name not in self.told:
                self.told.add(name)
                self.log(f"hot swap: round {rnd} has a new expert {name!r}; restart fedmoe serve to serve it")
        missing = [e for e in self.served.experts if e not in names]
        if missing:
            raise FedmoeError(f"round {rnd} has no checkpoint of served expert(s) {', '.join(missing)}")
        deltas = {e: store.checkpoint(e, rnd) for e in self.served.experts}  # sha256-checked
        return self.served.prepare_swap(rnd, deltas)
