"""Gates: each maps prompts to a distribution over the served experts.

One module per gate, one registry line each. A gate class has `name`, `experts` (the
expert names, in the served model's order), `route(prompts) -> [n, K]` probabilities,
`state() -> (tensors, meta)` for saving, `from_state(served, tensors, meta)`, `needs_data`
(whether it can be built without the sites) and `site_requirements` (what it needs from
the sites, in words, for the report).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedmoe.server.moe.gates.arrow import ArrowGate
from fedmoe.server.moe.gates.learned import LearnedGate
from fedmoe.server.moe.gates.prototype import PrototypeGate
from fedmoe.server.moe.gates.smile import SmileGate
from fedmoe.shared.errors import FedmoeError

GATES = {
    "arrow": ArrowGate,
    "prototype": PrototypeGate,
    "learned": LearnedGate,
    "smile": SmileGate,
}


def gate_class(name: str):
    if name not in GATES:
        raise FedmoeError(f"unknown gate {name!r}: choose one of {', '.join(GATES)}")
    return GATES[name]


def save_gate(gate, folder: str | Path) -> Path:
    """Write `<folder>/<gate.name>.safetensors` (tensors + JSON metadata), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = gate.state()
    path = folder / f"{gate.name}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"gate": gate.name, "experts": json.dumps(list(gate.experts)), "meta": json.dumps(meta)})
    tmp.replace(path)
    return path


def load_gate(served, name: str, folder: str | Path):
    """A saved gate for `served`; the arrow gate needs no saved state (it reads the experts)."""
    cls = gate_class(name)
    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        if getattr(cls, "needs_data", True):
            raise FedmoeError(f"gate {name!r} has no saved state ({path} not found); build it with `fedmoe simulate`")
        return cls(served)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
        experts, meta = json.loads(header["experts"]), json.loads(header["meta"])
    except Exception as exc:  # safetensors and json raise their own types
        raise FedmoeError(f"{path}: unreadable gate file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if experts != list(served.experts):
        raise FedmoeError(f"{path}: gate routes over experts {experts}, but the run serves {list(served.experts)}")
    return cls.from_state(served, tensors, meta)


def available_gates(folder: str | Path) -> list[str]:
    """Gates that can be served from a run: those with saved state, plus data-free ones."""
    folder = Path(folder)
    return [n for n, cls in GATES.items() if not getattr(cls, "needs_data", True) or (folder / f"{n}.safetensors").is_file()]
