"""The site's commands: `fedmoe train-local` and `fedmoe site start`."""

from __future__ import annotations

from fedmoe.client.commands import site, train_local

COMMANDS = (train_local, site)  # the order of --help


def register(sub) -> None:
    for module in COMMANDS:
        module.register(sub)
