"""Fault injection: SIGKILL the coordinator at a named point of a round, for crash tests.

    FEDMOE_FAULT=kill:aggregate:2 fedmoe simulate ...   # dies while aggregating round 2

A spec is `kill:POINT:ROUND`, several joined by commas. The points, in round order:

- `train`: the round's TRAIN messages are out and the first reply is in (the other
  sites are still training, if any);
- `aggregate`: the replies are validated and the first expert of the round is
  aggregated in memory, the others not yet (with one expert: after it);
- `checkpoint`: the first expert checkpoint of the round is written to its temporary
  file, not yet renamed into place (nothing of the round is in SQLite);
- `commit`: every checkpoint of the round is renamed into place, the SQLite
  transaction that commits the round has not run.

Read in the process that runs the ServerApp (`fedmoe simulate`: the simulate process
itself; its Ray workers, the sites, never reach these points). `fedmoe simulate` and
`fedmoe coordinator start` refuse a mistyped spec in one line before starting.

The coordinator calls `fault_point(name, round)` at each point; with no FEDMOE_FAULT
(the normal case) that is one environment lookup. SIGKILL, not an exception: nothing
(no `finally`, no atexit, no flush) runs, as when the machine loses power.
"""

from __future__ import annotations

import os
import signal

from fedmoe.shared.errors import FedmoeError

ENV = "FEDMOE_FAULT"
POINTS = ("train", "aggregate", "checkpoint", "commit")


def parse_faults(spec: str | None) -> set[tuple[str, int]]:
    """`kill:POINT:ROUND[,...]` -> {(point, round)}; one-line FedmoeError on anything else."""
    out = set()
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] != "kill":
            raise FedmoeError(f"{ENV}: {item!r} is not kill:POINT:ROUND (e.g. kill:aggregate:2)")
        if parts[1] not in POINTS:
            raise FedmoeError(f"{ENV}: unknown fault point {parts[1]!r} in {item!r}: choose from {', '.join(POINTS)}")
        if not parts[2].isdigit() or int(parts[2]) < 1:
            raise FedmoeError(f"{ENV}: round must be a whole number >= 1, got {parts[2]!r} in {item!r}")
        out.add((parts[1], int(parts[2])))
    return out


def armed_faults() -> set[tuple[str, int]]:
    """The faults FEDMOE_FAULT asks for (checked: call early to fail fast on a typo)."""
    return parse_faults(os.environ.get(ENV))


def fault_point(name: str, rnd: int) -> None:
    """Die here (SIGKILL this process) if FEDMOE_FAULT names this point and round."""
    spec = os.environ.get(ENV)
    if spec and (name, rnd) in parse_faults(spec):
        os.kill(os.getpid(), signal.SIGKILL)
