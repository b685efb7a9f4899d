"""Static merges of the experts into one adapter: the baselines the gates must beat.

Done as the model-merging field does them, on the full updates ΔW_k = s_k B_k A_k
(never on A and B separately: a sum of A's times a sum of B's mixes every expert's B
with every other expert's A), all through peft's `add_weighted_adapter`:

- `cat`: exactly Σ λ ΔW_k, as one adapter of rank Σ r_k (the factors stacked);
- `svd`: the same sum re-factorized by SVD at full rank Σ r_k, so also exact (equal
  to `cat` up to float error; kept because users know the name, and it now means that);
- `ties_svd`: TIES (trim to `density`, elect sign, disjoint mean; Yadav et al. 2023) on
  the ΔW_k, scaled by λ, re-factorized by SVD at rank Σ r_k;
- `dare_ties_svd`: DARE (drop at random, rescale by 1/density; Yu et al. 2024), then
  TIES, on the ΔW_k, scaled by λ, SVD at rank Σ r_k.

λ is one scalar per merge, the same for every expert, and TIES/DARE's density is one
too; both are chosen on validation data (`tune_static_merge`: the sites' own eval
records, never the mixed test set). The grids: λ ∈ {0.5, 1, 1.5, 2} / K for the sums
(1/K is the average expert), λ ∈ {0.5, 1, 1.5, 2} for TIES/DARE (their disjoint mean
already averages), density ∈ {0.3, 0.5, 0.7}.

The old `linear`, `ties` and `dare_ties` (peft's A/B-separate combinations) are gone.

How they are computed. peft's `add_weighted_adapter` builds `cat` (the stacked factors);
the others are re-factorized here from it, because peft's own svd path takes a full dense
SVD of every module (measured on SmolLM2-135M, 210 modules, 2 loaded cores: `svd` 17 s,
`ties_svd` 282 s a merge, and tuning tries 32 merges):
- `svd`: exactly, from the factors: QR of the stacked B and Aᵀ, then the SVD of the small
  Σr x Σr core (the sum has rank ≤ Σr, so nothing is truncated);
- `ties_svd` / `dare_ties_svd`: peft's own `ties` / `dare_ties` (`peft.utils.merge_utils`)
  on the experts' ΔW, then the top-Σr SVD of the result: exact (thin SVD) for a module whose
  smaller side is at most 4 x Σr, else randomized (`torch.svd_lowrank`, Σr + 16 columns,
  4 power iterations), whose truncation error is within 1% of the exact SVD's on these
  trimmed updates (tests/test_moe_gates.py);
- every merge is λ times the merge at λ = 1 (TIES's trim and sign election are scale-free,
  DARE's mask is seeded), so tuning builds each (method, density) once and rescales B.
"""

from __future__ import annotations

import itertools

from fedmoe.shared.errors import FedmoeError

LAMBDA_GRID = (0.5, 1.0, 1.5, 2.0)
DENSITY_GRID = (0.3, 0.5, 0.7)

# method -> peft combination_type, whether λ is divided by K (a sum), whether it has a density
STATIC_MERGES = {
    "cat": {"combination_type": "cat", "sum": True, "density": False},
    "svd": {"combination_type": "svd", "sum": True, "density": False},
    "ties_svd": {"combination_type": "ties_svd", "sum": False, "density": True},
    "dare_ties_svd": {"combination_type": "dare_ties_svd", "sum": False, "density": True},
}


def _spec(method: str) -> dict:
    if method not in STATIC_MERGES:
        raise FedmoeError(f"unknown static merge {method!r}: choose one of {', '.join(STATIC_MERGES)}")
    return STATIC_MERGES[method]


def default_params(method: str, experts: int) -> dict:
    """λ and density before tuning: the average expert for sums, λ 1 and density 0.5 for TIES/DARE."""
    spec = _spec(method)
    return {"lambda": 1.0 / max(1, experts) if spec["sum"] else 1.0} | ({"density": 0.5} if spec["density"] else {})


def param_grid(method: str, experts: int) -> list[dict]:
    spec = _spec(method)
    lambdas = [c / max(1, experts) for c in LAMBDA_GRID] if spec["sum"] else list(LAMBDA_GRID)
    densities = DENSITY_GRID if spec["density"] else (None,)
    return [{"lambda": lam} | ({"density": d} if d is not None else {}) for lam, d in itertools.product(lambdas, densities)]


def merged_rank(peft_model, experts: list[str]) -> int:
    return sum(int(peft_model.peft_config[e].r) for e in experts)


def add_static_merge(peft_model, experts: list[str], method: str, adapter_name: str | None = None,
                     params: dict | None = None, seed: int = 0) -> str:
    """Add the merge of `experts` as a new adapter on `peft_model`; returns its name.
    `params`: {"lambda": .., "density": ..} (defaults: `default_params`)."""
    import torch

    spec = _spec(method)
    if not experts:
        raise FedmoeError("no experts to merge")
    missing = [e for e in experts if e not in peft_model.peft_config]
    if missing:
        raise FedmoeError(f"static merge {method!r}: no adapter named {missing[0]!r} on the model")
    p = default_params(method, len(experts)) | dict(params or {})
    lam = float(p["lambda"])
    density = float(p["density"]) if spec["density"] else None
    if density is not None and not 0.0 < density <= 1.0:
        raise FedmoeError(f"static merge {method!r}: density must be in (0, 1], got {p['density']}")
    name = adapter_name or f"static_{method}"
    if name in peft_model.peft_config:
        peft_model.delete_adapter(name)
    try:  # one adapter of rank Σ r_k holding exactly Σ λ ΔW_k: peft's `cat`
        peft_model.add_weighted_adapter(list(experts), [lam] * len(experts), name, combination_type="cat")
    except (ValueError, RuntimeError) as exc:
        raise FedmoeError(f"static merge {method!r} failed: {str(exc).splitlines()[0]}") from None
    if spec["combination_type"] != "cat":
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # DARE drops at random (peft draws from the global generator)
        for target in lora_modules(peft_model, name):
            if spec["combination_type"] == "svd":
                a, b = exact_svd_factors(target, name)
            else:
                a, b = trimmed_svd_factors(target, name, list(experts), lam, spec["combination_type"],
                                           density, generator)
            target.lora_A[name].weight.data.copy_(a)
            target.lora_B[name].weight.data.copy_(b / target.scaling[name])
    return name


def lora_modules(peft_model, adapter: str) -> list:
    """The LoRA layers (linear) that carry `adapter`."""
    return [m for m in peft_model.modules() if hasattr(m, "lora_A") and adapter in getattr(m, "lora_A", {})]


def exact_svd_factors(target, adapter: str):
    """(Vh, U·S) of the adapter's own ΔW = scaling · B A, from its factors: QR of B and Aᵀ,
    then the SVD of the small r x r core. Exact: ΔW has rank ≤ r."""
    import torch

    b = target.lora_B[adapter].weight.detach().double() * target.scaling[adapter]
    a = target.lora_A[adapter].weight.detach().double()
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, sv, vh = torch.linalg.svd(rb @ ra.T)
    r = a.shape[0]
    return (vh @ qa.T)[:r].float(), ((qb @ u) * sv)[:, :r].float()


def trimmed_svd_factors(target, adapter: str, experts: list[str], lam: float, combination: str, density: float,
                        generator):
    """TIES (or DARE-TIES) of the experts' ΔW with weight λ each (peft's merge_utils), then
    its top-r SVD as (Vh, U·S), r = the adapter's rank."""
    import torch
    from peft.utils.merge_utils import dare_ties, ties

    deltas = [target.get_delta_weight(e).detach().float() for e in experts]
    weights = torch.tensor([lam] * len(experts))
    merged = (ties if combination == "ties_svd" else dare_ties)(deltas, weights, density, "total")
    if getattr(target, "fan_in_fan_out", False):  # GPT-2's Conv1D: ΔW comes in the weight's (in, out) layout
        merged = merged.T
    r = target.lora_A[adapter].weight.shape[0]
    return top_svd(merged, r, generator)


def top_svd(m, r: int, generator=None):
    """(Vh_r, U_r·S_r) of m's best rank-r approximation: thin SVD when m's smaller side is
    at most 4r (exact, cheap), else the randomized range finder (r + 16 columns, 4 power
    iterations), whose error is within ~1% of the exact truncation's here."""
    import torch

    if min(m.shape) <= 4 * r:
        u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    else:
        q = min(r + 16, min(m.shape))
        state = torch.random.get_rng_state()
        if generator is not None:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        try:
            u, sv, v = torch.svd_lowrank(m, q=q, niter=4)
        finally:
            torch.random.set_rng_state(state)
        vh = v.T
    return vh[:r].contiguous(), (u[:, :r] * sv[:r]).contiguous()


def scale_merge(peft_model, adapter: str, factor: float) -> None:
    """Multiply a merged adapter's ΔW by `factor` (its B)."""
    for target in lora_modules(peft_model, adapter):
        target.lora_B[adapter].weight.data.mul_(factor)


def tune_static_merge(served, name: str, validation_records: list, score_fn, seed: int = 0,
                      grid: list[dict] | None = None) -> tuple[dict, object]:
    """Grid-search λ (and density) for merge `name` on `validation_records`.

    `score_fn(adapter_name, records)` scores the merged adapter, higher is better (any
    comparable, e.g. (accuracy, -loss)). Only `validation_records` ever reach it: pass the
    sites' own eval records, not the test set. Returns (best params, its score); the
    merge is left off the model (add it again with those params).
    """
    if not validation_records:
        raise FedmoeError(f"static merge {name!r}: no validation records to tune on")
    model, experts = served.model, list(served.experts)
    grid = list(grid or param_grid(name, len(experts)))
    # Each density's λs one after another: one build per density, then rescales (the
    # grid itself lists λ-major, which would rebuild at every point).
    order = sorted(range(len(grid)), key=lambda i: repr(grid[i].get("density")))
    scores: dict[int, object] = {}
    adapter, built = f"static_{name}_tuning", None  # built: (density, λ) of the merge on the model
    try:
        for i in order:
            lam, density = float(grid[i]["lambda"]), grid[i].get("density")
            if built is not None and built[0] == density and built[1] != 0:
                scale_merge(model, adapter, lam / built[1])  # merge(λ) = λ merge(1): no rebuild
            else:
                add_static_merge(model, experts, name, adapter_name=adapter, params=grid[i], seed=seed)
            built = (density, lam)
            scores[i] = score_fn(adapter, validation_records)
    finally:
        if adapter in model.peft_config:
            model.delete_adapter(adapter)
    best = max(scores, key=lambda i: (scores[i], -i))  # a tie goes to the first in grid order
    return dict(grid[best]), scores[best]
