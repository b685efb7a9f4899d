"""The coordinator's commands: serve/ask, coordinator start, keys, export/edge, dashboard/status."""

from __future__ import annotations

from fedmoe.server.commands import coordinator, dashboard, export, keys, serve

COMMANDS = (serve, coordinator, keys, export, dashboard)  # the order of --help


def register(sub) -> None:
    for module in COMMANDS:
        module.register(sub)
