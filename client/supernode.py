"""`python -m fedmoe.client.supernode [flower-supernode args]`: Flower's SuperNode with
a shorter poll.

Flower 1.42's SuperNode asks the SuperLink for a message, and when there is none sleeps
a fixed 3 s before asking again; after handing a message to its ClientApp it checks for
the reply every 0.5 s (`flwr/supernode/start_client_internal.py`; neither is a flag or
an environment variable). On a round of a few seconds that is most of the deployed
overhead. This entry point runs the unchanged SuperNode with those two waits capped at
FEDMOE_SUPERNODE_POLL_S seconds (what `fedmoe site start --poll-interval` sets): each
poll is one small Fleet API call, so 1 s costs a coordinator with 1,000 sites ~1,000
calls a second, and 0.25 s is for a handful of sites. Only that module's `time` is
replaced; everything else the SuperNode does is Flower's own.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "FEDMOE_SUPERNODE_POLL_S"


class CappedSleep:
    """The `time` module, except that sleep(s) sleeps min(s, cap)."""

    def __init__(self, cap: float):
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name):
        return getattr(time, name)


def poll_cap() -> float | None:
    raw = os.environ.get(ENV)
    if raw in (None, ""):
        return None
    try:
        cap = float(raw)
    except ValueError:
        raise SystemExit(f"fedmoe supernode: {ENV} must be a number of seconds, got {raw!r}") from None
    if not 0.05 <= cap <= 3.0:
        raise SystemExit(f"fedmoe supernode: {ENV} must be between 0.05 and 3 seconds, got {cap}")
    return cap


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    cap = poll_cap()
    if cap is not None:
        start_client_internal.time = CappedSleep(cap)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
