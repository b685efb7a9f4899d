"""The run folder layout (`--out` of `fedmoe simulate`, `--run` of serve/export).

    OUT/run.json              base model dir + fingerprint, preset, seed, domains
    OUT/run.db                the run store (SQLite)
    OUT/experts/<domain>/     final experts, standard peft adapter directories
    OUT/report.json, report.md, *.png
"""

from __future__ import annotations

import json
from pathlib import Path

from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.names import check_name, inside


def write_atomically(path: str | Path, text: str) -> Path:
    """Write, then rename: a reader (or a crash) sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def write_run_info(run_dir: str | Path, **info) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_atomically(run_dir / "run.json", json.dumps(info, indent=2, sort_keys=True, default=str))


def read_run_info(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedmoeError(f"run folder not found: {run_dir}")
    path = run_dir / "run.json"
    if not path.is_file():
        raise FedmoeError(f"not a fedmoe run folder (no run.json): {run_dir}")
    return json.loads(path.read_text())


def list_experts(run_dir: str | Path) -> list[str]:
    experts = Path(run_dir) / "experts"
    return sorted(p.name for p in experts.iterdir() if (p / "adapter_config.json").is_file()) if experts.is_dir() else []


def expert_dir(run_dir: str | Path, name: str) -> Path:
    read_run_info(run_dir)
    check_name(name, "expert", f"run {run_dir}")  # `--expert ../../x` must not reach outside the run
    path = inside(Path(run_dir) / "experts", Path(run_dir) / "experts" / name, "expert folder")
    if not (path / "adapter_config.json").is_file():
        known = list_experts(run_dir)
        raise FedmoeError(f"unknown expert {name!r} in {run_dir}: known experts are {', '.join(known) or 'none'}")
    return path
