"""`python -m fedmoe.client.supernode [flower-supernode args]`: Flower's SuperNode with
a shorter poll, that runs only fedmoe's own app bundle.

Flower 1.42's SuperNode asks the SuperLink for a message, and when there is none sleeps
a fixed 3 s before asking again; after handing a message to its ClientApp it checks for
the reply every 0.5 s (`flwr/supernode/start_client_internal.py`; neither is a flag or
an environment variable). On a round of a few seconds that is most of the deployed
overhead. This entry point runs the unchanged SuperNode with those two waits capped at
FEDMOE_SUPERNODE_POLL_S seconds (what `fedmoe site start --poll-interval` sets): each
poll is one small Fleet API call, so 1 s costs a coordinator with 1,000 sites ~1,000
calls a second, and 0.25 s is for a handful of sites. Only that module's `time` is
replaced.

Before the SuperNode stores a run's app bundle (FAB) it checks it
(`fedmoe.client.bundle_check`): a bundle that is not fedmoe's own app, or not one of the
sha256 digests in FEDMOE_TRUST_FAB_HASH when that is set (`fedmoe site start
--trust-fab-hash`), is refused where Flower 1.42 refuses one that `--trusted-entities`
cannot verify (`_pull_and_store_message` in `flwr/supernode/start_client_internal.py`):
the run is not stored, no ClientApp task is created, the message gets Flower's
INVALID_FAB error reply, the site logs one line naming what differed, and the SuperNode
goes on serving other runs. Runtime dependency installation (which would install the
bundle's `[project] dependencies`) is refused. Everything else is Flower's own.
"""

from __future__ import annotations

import os
import sys
import time
from logging import ERROR

ENV = "FEDMOE_SUPERNODE_POLL_S"
TRUST_ENV = "FEDMOE_TRUST_FAB_HASH"
MAX_REMEMBERED = 256  # refused bundles remembered by hash, so a foreign run's later messages skip the download


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


def trusted_hashes() -> frozenset[str]:
    from fedmoe.client.bundle_check import parse_hashes
    from fedmoe.shared.errors import FedmoeError

    try:
        return parse_hashes([os.environ.get(TRUST_ENV, "")])
    except FedmoeError as err:
        raise SystemExit(f"fedmoe supernode: {TRUST_ENV}: {err}") from None


def guard_bundles(module, trusted: frozenset[str] = frozenset()):
    """Replace `module._pull_and_store_message` (Flower's start_client_internal) with one
    that checks each run's bundle when the SuperNode fetches it; returns the original."""
    from flwr.app import Message
    from flwr.supercore import log

    from fedmoe.client.bundle_check import ForeignBundle, check_bundle

    original = module._pull_and_store_message
    refused: dict[str, str] = {}

    def _pull_and_store_message(**kwargs):
        pulled = {}
        receive, get_fab = kwargs["receive"], kwargs["get_fab"]

        def receive_and_keep():
            received = receive()
            pulled["message"] = received[0] if received is not None else None
            return received

        def get_checked_fab(fab_hash: str, run_id: int):
            if fab_hash in refused:
                raise ForeignBundle(refused[fab_hash])
            fab = get_fab(fab_hash, run_id)
            try:
                check_bundle(fab.content, trusted)
            except ForeignBundle as err:
                if len(refused) >= MAX_REMEMBERED:
                    refused.clear()
                refused[fab_hash] = str(err)
                raise
            return fab

        try:
            return original(**{**kwargs, "receive": receive_and_keep, "get_fab": get_checked_fab})
        except ForeignBundle as err:
            message = pulled["message"]
            run_id = message.metadata.run_id
            log(ERROR, "fedmoe site: refused the app bundle of run %s (its ClientApp does not run): %s", run_id, err)
            reply = Message(module.FAB_VERIFICATION_ERROR, reply_to=message)
            module._insert_message(reply, kwargs["state"], kwargs["object_store"])
            return run_id

    module._pull_and_store_message = _pull_and_store_message
    return original


def main() -> None:
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    allow = "--allow-runtime-dependency-installation"
    if any(len(a) >= 4 and allow.startswith(a.split("=")[0]) for a in sys.argv[1:]):  # argparse takes prefixes
        raise SystemExit("fedmoe supernode: --allow-runtime-dependency-installation would install what a bundle's "
                         "[project] dependencies name; a fedmoe site runs only the installed fedmoe")
    cap = poll_cap()
    if cap is not None:
        start_client_internal.time = CappedSleep(cap)
    guard_bundles(start_client_internal, trusted_hashes())
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
