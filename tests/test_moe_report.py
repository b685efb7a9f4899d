"""`moe_methods`: the MoE entries `fedmoe simulate` merges into report.json, and the
latency benchmark."""

from __future__ import annotations

import json

import pytest

from fedmoe.shared.errors import FedmoeError

METHODS = ("moe_arrow", "moe_smile", "moe_prototype", "moe_learned", "static_cat", "static_svd", "static_ties_svd",
           "static_dare_ties_svd")


def test_moe_methods_report_fields(tiny_model_dir, domain_adapters, suite_dir, tmp_path):
    from fedmoe.simulations.moe_report import moe_methods
    from fedmoe.shared.data import find_sites, load_mixed_eval, load_site

    mixed = load_mixed_eval(suite_dir)[:64]  # enough to compare methods; keeps the test short
    sites = [load_site(p) for p in find_sites(suite_dir)]
    methods = moe_methods(tiny_model_dir, domain_adapters, mixed, sites, seed=0, device="cpu",
                          gate_dir=tmp_path / "gates", latency_requests=3, latency_new_tokens=2,
                          include_oracle=True, router_max_records=32)
    assert set(methods) == set(METHODS) | {"experts_oracle"}
    domains = sorted(domain_adapters)
    for name, entry in methods.items():
        assert sorted(entry["per_domain"]) == domains, name
        assert 0.0 <= entry["mixed"] <= 1.0
        assert all(0.0 <= v <= 1.0 for v in entry["per_domain"].values())
    for gate in ("arrow", "smile", "prototype", "learned"):
        entry = methods[f"moe_{gate}"]
        assert 0.0 <= entry["routing_accuracy"] <= 1.0
        assert entry["latency_ratio"] > 0 and entry["latency"]["requests"] == 3
    # Static merges say which λ (and density) validation chose, and on how many site eval records.
    for m in METHODS:
        if m.startswith("static_"):
            assert methods[m]["params"]["lambda"] > 0 and methods[m]["validation_records"] > 0, m
            assert ("density" in methods[m]["params"]) == ("ties" in m), m
    assert methods["moe_smile"]["gate"]["site_requirements"].startswith("nothing")
    # The learned gate trains its router under DP by default and says so next to the gate,
    # in the prototype gate's shape (private, epsilon, delta, noise_multiplier, clip_norm).
    learned, proto = methods["moe_learned"]["gate"], methods["moe_prototype"]["gate"]
    from fedmoe.server.moe.gates.learned import DEFAULT_ROUTER_CLIP, DEFAULT_ROUTER_NOISE_MULTIPLIER

    assert learned["private"] and proto["private"]
    assert learned["noise_multiplier"] == DEFAULT_ROUTER_NOISE_MULTIPLIER and learned["clip_norm"] == DEFAULT_ROUTER_CLIP
    assert learned["epsilon"] == pytest.approx(learned["epsilon_router"] + learned["epsilon_center"])
    assert learned["epsilon_center"] == pytest.approx(proto["epsilon"]) and 0 < learned["epsilon_router"] < 100
    assert all("router_loss" not in h and h["sites_over_clip"] == 0 for h in learned["history"])
    # The data-driven gates route well, and the best gate beats every static merge.
    assert methods["moe_prototype"]["routing_accuracy"] >= 0.9
    best_gate = max(methods[f"moe_{g}"]["mixed"] for g in ("arrow", "smile", "prototype", "learned"))
    assert best_gate > max(methods[m]["mixed"] for m in METHODS if m.startswith("static_"))
    assert best_gate >= 0.9 * methods["experts_oracle"]["mixed"]
    json.dumps(methods)  # report.json-ready
    saved = sorted(p.name for p in (tmp_path / "gates").iterdir())
    assert saved == ["arrow.safetensors", "features.json", "learned.safetensors", "prototype.safetensors", "smile.safetensors"]


def test_moe_methods_refuses_a_domain_without_expert(tiny_model_dir, domain_adapters, suite_dir):
    from fedmoe.simulations.moe_report import moe_methods
    from fedmoe.shared.data import load_mixed_eval

    experts = {d: p for d, p in domain_adapters.items() if d != "law"}
    with pytest.raises(FedmoeError, match="domain\\(s\\) law with no expert"):
        moe_methods(tiny_model_dir, experts, load_mixed_eval(suite_dir), [], device="cpu")


def test_latency_benchmark_runs(tmp_path, capsys):
    from fedmoe.shared.cli import main

    code = main(["bench", "latency", "--requests", "2", "--new-tokens", "2", "--gates", "prototype",
                 "--out", str(tmp_path), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    r = result["gates"]["prototype"]
    assert r["latency_ratio"] > 0 and r["gated_ms"] > 0 and r["single_lora_ms"] > 0
    assert (tmp_path / "latency.json").is_file() and (tmp_path / "latency.png").is_file()
