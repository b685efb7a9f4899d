"""Names that become paths: domains, sites and experts.

A site announces its name and domain in the describe reply, and the coordinator
builds folders from them (`experts/<domain>/`, `checkpoints/round-N/<expert>.safetensors`).
A name like "../../victim" or "/etc" would then write outside the run folder, so every
name is checked where it enters (the describe reply, site.toml, a CLI argument) and
every path built from one is checked to stay inside its root.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedmoe.shared.errors import FedmoeError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RULE = "1-64 letters, digits, '_' or '-', starting with a letter or digit"


def shown(value, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: an error line stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_name(value, what: str, where: str) -> str:
    """`value` if it is a safe name (see RULE), else a one-line FedmoeError naming what,
    where and the offending value."""
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        raise FedmoeError(f"{where}: {what} name {shown(value)} is not allowed (use {RULE})")
    return value


def inside(root: str | Path, path: str | Path, what: str = "path") -> Path:
    """`path`, after checking that it resolves (symlinks followed) inside `root`: the last
    line of defence when a name slipped past `check_name`."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if not path_r.is_relative_to(root_r):
        raise FedmoeError(f"{what} {shown(str(path))} leaves its folder {root_r}")
    return Path(path)
