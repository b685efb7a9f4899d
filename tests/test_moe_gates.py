"""The MoE layer as a library: gates, the served model's routing paths, static merges,
and what a site sends for the prototype gate."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from fedmoe.shared.errors import FedmoeError


@pytest.fixture(scope="module")
def sites(suite_dir):
    from fedmoe.shared.data import find_sites, load_site

    return [load_site(p) for p in find_sites(suite_dir)]


@pytest.fixture(scope="module")
def mixed(suite_dir):
    from fedmoe.shared.data import load_mixed_eval

    return load_mixed_eval(suite_dir)


@pytest.fixture(scope="module")
def served(tiny_model_dir, domain_adapters, sites):
    from fedmoe.simulations.moe_report import build_gates
    from fedmoe.server.moe.served_model import ServedModel

    served = ServedModel(tiny_model_dir, domain_adapters, "cpu")
    # the learned gate without router DP here: this module checks routing quality; the DP
    # path is checked in tests/test_privacy.py and measured on the smoke preset (README)
    served.build_info = build_gates(served, sites, seed=0, router_max_records=32, router_privacy=None)
    return served


def test_site_prototype_message_has_no_text_and_no_token_ids(tiny_model_dir, sites):
    """What a site sends for the prototype gate, computed on its own NF4 model: one
    float vector and a few numbers, noised; nothing that is text or token ids."""
    from fedmoe.client.prototype import PrototypeMessage, site_prototype
    from fedmoe.shared.features import FeatureConfig, PromptFeaturizer
    from fedmoe.shared.modeling import load_base_model, load_tokenizer

    site = sites[0]
    model = load_base_model(tiny_model_dir, "nf4", "cpu")
    featurizer = PromptFeaturizer(model, load_tokenizer(tiny_model_dir), FeatureConfig())
    msg = site_prototype(featurizer, site.train)

    sent = {f.name: getattr(msg, f.name) for f in dataclasses.fields(PrototypeMessage)}
    for name, value in sent.items():
        assert not isinstance(value, (str, bytes, list, tuple, dict)), f"{name} is {type(value).__name__}"
        if isinstance(value, torch.Tensor):
            assert value.dtype == torch.float32 and value.dim() == 1 and value.numel() == featurizer.cfg.dim
            assert not torch.equal(value, value.round()), "an integer-valued vector could carry token ids"
        else:
            assert isinstance(value, (int, float))
    assert sent["count"] == len(site.train)
    # The Flower form carries exactly the same: one float array, numbers only.
    arrays, metrics = msg.to_records()
    assert list(arrays.keys()) == ["prototype"]
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    back = PrototypeMessage.from_records(arrays, metrics)
    assert torch.equal(back.prototype, msg.prototype) and back.count == msg.count
    # Noised: two releases of the same data differ; and the guarantee is stated.
    again = site_prototype(featurizer, site.train)
    assert not torch.allclose(again.prototype, msg.prototype)
    assert 0 < msg.epsilon(1e-5) < 100


def test_arrow_gate_uses_no_data(served):
    from fedmoe.server.moe.gates import GATES
    from fedmoe.server.moe.gates.arrow import ROUTER, ArrowGate

    params = set(inspect.signature(ArrowGate.__init__).parameters) - {"self"}
    assert params == {"served", "top_k", "temperature", "blocks", "seed"}
    assert GATES["arrow"] is ArrowGate and ArrowGate.needs_data is False
    assert served.build_info["arrow"] == {"data_used": 0}
    # peft's Arrow router sits on the model, over exactly the experts.
    assert ROUTER in served.model.peft_config
    assert served.model.peft_config[ROUTER].arrow_config.task_adapter_names == served.experts
    w = served.route(["The judge in the court read the deed. Answer:", "A nurse in the ward. Answer:"], "arrow")
    assert w.shape == (2, len(served.experts))
    assert torch.allclose(w.sum(1), torch.ones(2), atol=1e-5)


def test_data_driven_gates_route_mixed_prompts_to_their_domain(served, mixed):
    from fedmoe.simulations.moe_report import routing_accuracy
    from fedmoe.shared.training import evaluate

    oracle = evaluate(served.lm, served.tokenizer, mixed,
                      forward_kwargs_fn=lambda recs: {"adapter_names": [r.domain for r in recs]})
    for gate in ("prototype", "learned"):
        acc, per_domain = routing_accuracy(served, gate, mixed)
        assert acc >= 0.9, (gate, acc, per_domain)
        result = evaluate(served.lm, served.tokenizer, mixed, forward_kwargs_fn=served.forward_kwargs_fn(gate))
        assert result.accuracy >= 0.9 * oracle.accuracy, (gate, result.accuracy, oracle.accuracy)
    history = served.build_info["learned"]["history"]
    assert history[-1]["router_loss"] < history[0]["router_loss"]
    # each data-driven gate states its privacy in one shape
    assert served.build_info["learned"]["private"] is False and "not private" in served.build_info["learned"]["privacy"]
    proto = served.build_info["prototype"]
    assert proto["private"] is True and 0 < proto["epsilon"] < 100 and proto["delta"] == 1e-5
    assert not torch.equal(served.gates["learned"].router.center, torch.zeros_like(served.gates["learned"].router.center))


def test_topk_mixing_matches_adapter_names_for_one_hot_weights(served, mixed):
    """The top-k path (hooks mixing the experts' LoRA outputs) and peft's mixed batch
    agree when each sequence's weight is all on one expert."""
    from fedmoe.shared.training import collate, encode_record

    records = mixed[:12]
    batch = collate([encode_record(served.tokenizer, r, 128) for r in records], served.tokenizer.pad_token_id, served.device)
    names = [served.experts[i % len(served.experts)] for i in range(len(records))]
    one_hot = torch.zeros(len(records), len(served.experts))
    for i, n in enumerate(names):
        one_hot[i, served.experts.index(n)] = 1.0
    with torch.no_grad():
        a = served.lm(batch["input_ids"], batch["attention_mask"], adapter_names=names).logits
        b = served.lm(batch["input_ids"], batch["attention_mask"], expert_weights=one_hot).logits
    assert torch.allclose(a, b, atol=1e-4)
    # A real top-2 mix runs and generates.
    out = served.generate([records[0].prompt], 4, gate="prototype", top_k=2)
    text, weights = out[0]
    assert isinstance(text, str) and int((weights > 0).sum()) <= 2
    assert abs(float(weights.sum()) - 1) < 1e-5


def test_gated_generation_answers_like_the_routed_expert(served, mixed):
    r = mixed[0]
    (text, weights), = served.generate([r.prompt], 6, gate="prototype")
    chosen = served.experts[int(weights.argmax())]
    (single, _), = served.generate([r.prompt], 6, adapter=chosen)
    assert text == single


def _delta_weights(model, name):
    from peft.tuners.lora import LoraLayer

    return {k: m.get_delta_weight(name).detach() for k, m in model.named_modules()
            if isinstance(m, LoraLayer) and name in m.lora_A}


def test_static_merges_are_exact_sums_and_ties_on_delta_w(served, mixed):
    """cat (and full-rank svd) is exactly Σ λ ΔW_k on real LoRA adapters; TIES/DARE
    work on ΔW and run; every merge evaluates."""
    from fedmoe.server.moe.static_merge import STATIC_MERGES, add_static_merge, merged_rank
    from fedmoe.shared.training import evaluate

    assert set(STATIC_MERGES) == {"cat", "svd", "ties_svd", "dare_ties_svd"}
    lam = 0.7
    experts = {e: _delta_weights(served.model, e) for e in served.experts}
    expected = {k: sum(lam * experts[e][k] for e in served.experts) for k in experts[served.experts[0]]}
    for method in STATIC_MERGES:
        name = add_static_merge(served.model, served.experts, method, params={"lambda": lam, "density": 0.5})
        try:
            assert served.model.peft_config[name].r == merged_rank(served.model, served.experts)
            got = _delta_weights(served.model, name)
            assert set(got) == set(expected)
            if method in ("cat", "svd"):
                for k in expected:
                    assert torch.allclose(got[k], expected[k], atol=1e-5), (method, k, float((got[k] - expected[k]).abs().max()))
            else:  # TIES keeps at most `density` of each ΔW_k and never exceeds the λ-scaled sum's magnitude by much
                assert all(torch.isfinite(v).all() for v in got.values())
                assert any(not torch.allclose(got[k], expected[k], atol=1e-5) for k in expected)
            result = evaluate(served.lm, served.tokenizer, mixed[:16], forward_kwargs_fn=served.expert_kwargs_fn(name))
            assert 0.0 <= result.accuracy <= 1.0
        finally:
            served.model.delete_adapter(name)
    with pytest.raises(FedmoeError, match="unknown static merge"):
        add_static_merge(served.model, served.experts, "linear")
    with pytest.raises(FedmoeError, match="density must be in"):
        add_static_merge(served.model, served.experts, "ties_svd", params={"density": 1.5})


def test_static_merge_tuning_sees_only_the_validation_records(served, sites, mixed, monkeypatch):
    """Tuning scores every grid point on the validation records only, builds each density
    once (rescaling it per λ) and picks what a rebuild at every point would."""
    import fedmoe.server.moe.static_merge as static_merge
    from fedmoe.server.moe.static_merge import param_grid, tune_static_merge
    from fedmoe.simulations.moe_report import validation_split

    validation = validation_split(sites, per_site=2)
    site_eval = [r for s in sites for r in s.eval]
    assert validation and all(any(r is x for x in site_eval) for r in validation)
    seen, adapters, builds = [], [], []

    def delta_norm(adapter):  # of the merge on the model: ∝ λ, and depends on the density
        return sum(float(v.norm()) for v in _delta_weights(served.model, adapter).values())

    grid = [{"lambda": lam, "density": d} for lam in (0.5, 1.0) for d in (0.3, 0.7)]  # λ-major, as param_grid lists
    assert param_grid("ties_svd", len(served.experts))[:2] == [{"lambda": 0.5, "density": 0.3}, {"lambda": 0.5, "density": 0.5}]
    reference = []  # every grid point built from scratch
    for params in grid:
        name = static_merge.add_static_merge(served.model, served.experts, "ties_svd", adapter_name="ref", params=params)
        reference.append(delta_norm(name))
        served.model.delete_adapter(name)
    target = sorted(reference)[len(reference) // 2]

    def score(adapter, records):
        seen.append(list(records))
        adapters.append(adapter)
        assert served.model.peft_config[adapter].r > 0  # the merge under test is on the model
        return -abs(delta_norm(adapter) - target)  # best at an interior grid point

    build = static_merge.add_static_merge
    monkeypatch.setattr(static_merge, "add_static_merge", lambda *a, **k: builds.append(k["params"]) or build(*a, **k))
    params, best = tune_static_merge(served, "ties_svd", validation, score, grid=grid)
    monkeypatch.undo()
    assert len(seen) == len(grid) and params == grid[reference.index(target)] and best == pytest.approx(0, abs=1e-3 * target)
    assert len(builds) == 2  # one build per density, rescaled for each λ
    assert all(records == validation for records in seen)
    assert not any(r is m for rs in seen for r in rs for m in mixed)  # never a mixed test record
    assert all(a not in served.model.peft_config for a in adapters)  # tuning leaves no adapter behind
    lams = sorted({p["lambda"] for p in param_grid("cat", len(served.experts))})
    assert lams == pytest.approx([c / len(served.experts) for c in (0.5, 1.0, 1.5, 2.0)])
    with pytest.raises(FedmoeError, match="no validation records"):
        tune_static_merge(served, "cat", [], score)


def test_smile_gate_routes_zero_shot_above_chance(served, mixed):
    from fedmoe.server.moe.gates import GATES
    from fedmoe.server.moe.gates.smile import SmileGate, right_subspace
    from fedmoe.simulations.moe_report import routing_accuracy

    assert GATES["smile"] is SmileGate and SmileGate.needs_data is False
    assert served.build_info["smile"] == {"data_used": 0}
    # V_k from the factors equals the top-k right singular vectors of the full B A.
    layer, e = served.gates["smile"].layers[0], served.experts[0]
    a, b = layer.lora_A[e].weight.detach(), layer.lora_B[e].weight.detach()
    v = right_subspace(a, b, 4)
    vh = torch.linalg.svd((b @ a).double())[2][:4].float()
    assert torch.allclose(v @ v.T, vh.T @ vh, atol=1e-5)
    acc, per_domain = routing_accuracy(served, "smile", mixed)
    assert acc > 1.0 / len(served.experts), (acc, per_domain)
    w = served.route([r.prompt for r in mixed[:4]], "smile")
    assert torch.allclose(w.sum(1), torch.ones(4), atol=1e-5)
    for name, cls in GATES.items():
        assert isinstance(cls.site_requirements, str) and cls.site_requirements, name
    assert GATES["arrow"].site_requirements.startswith("nothing") and GATES["smile"].site_requirements.startswith("nothing")


def test_gate_state_round_trips_and_bad_requests_are_clear(served, mixed, tmp_path):
    from fedmoe.server.moe.gates import available_gates, load_gate, save_gate

    for name in ("prototype", "learned", "smile"):
        save_gate(served.gates[name], tmp_path)
        again = load_gate(served, name, tmp_path)
        prompts = [r.prompt for r in mixed[:8]]
        assert torch.allclose(again.route(prompts), served.gates[name].route(prompts), atol=1e-6)
    assert set(available_gates(tmp_path)) == {"arrow", "prototype", "learned", "smile"}
    with pytest.raises(FedmoeError, match="unknown gate 'oracle'"):
        served.route(["x"], "oracle")
    with pytest.raises(FedmoeError, match="empty prompt"):
        served.generate(["  "], 4, gate="prototype")
    with pytest.raises(FedmoeError, match="too many tokens"):
        served.generate(["A nurse asked. Answer:"], 10_000, gate="prototype")
    with pytest.raises(FedmoeError, match="no saved state"):
        load_gate(served, "learned", tmp_path / "nowhere")


def test_a_rescaled_merge_equals_a_merge_built_at_that_lambda_and_top_svd_is_near_exact(served):
    """Tuning rebuilds a merge only when its density changes (merge(λ) = λ merge(1)), and
    the randomized top-r SVD the trimmed merges use is within 1% of the exact truncation."""
    from fedmoe.server.moe.static_merge import add_static_merge, scale_merge, top_svd

    for method in ("svd", "ties_svd", "dare_ties_svd"):
        a = add_static_merge(served.model, served.experts, method, adapter_name="a", params={"lambda": 0.5, "density": 0.5})
        scale_merge(served.model, a, 1.5 / 0.5)
        b = add_static_merge(served.model, served.experts, method, adapter_name="b", params={"lambda": 1.5, "density": 0.5})
        try:
            got, want = _delta_weights(served.model, a), _delta_weights(served.model, b)
            for k in want:
                assert torch.allclose(got[k], want[k], atol=1e-5, rtol=1e-4), (method, k)
        finally:
            served.model.delete_adapter(a)
            served.model.delete_adapter(b)
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(300, 8, generator=gen) @ torch.randn(8, 200, generator=gen) * 5 + torch.randn(300, 200, generator=gen)
    for r in (4, 8, 12):
        vh, us = top_svd(m, r, torch.Generator().manual_seed(1))
        u, s, v = torch.linalg.svd(m, full_matrices=False)
        best = (m - (u[:, :r] * s[:r]) @ v[:r]).norm()
        assert (m - us @ vh).norm() <= 1.01 * best, r


def test_static_merges_on_a_fan_in_fan_out_model_keep_the_layout():
    """GPT-2's Conv1D layers store ΔW as (in, out) (peft's `fan_in_fan_out`): the static
    merges of two sign-agreeing experts, at density 1, are exact there too, on the
    rectangular layers as on the square one: cat/svd Σ λ ΔW_k, TIES/DARE-TIES the mean of
    the λ ΔW_k (every sign is elected, nothing is dropped, the disjoint merge averages)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedmoe.server.moe.static_merge import STATIC_MERGES, add_static_merge

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="a")
    model.add_adapter("b", config)
    for module in model.modules():
        if hasattr(module, "lora_A") and "a" in module.lora_A:
            module.lora_A["b"].weight.data.copy_(module.lora_A["a"].weight.data)
            module.lora_B["b"].weight.data.copy_(2 * module.lora_B["a"].weight.data)
    lam = 0.7
    a = _delta_weights(model, "a")
    assert {(32, 96), (32, 32), (128, 32)} == {tuple(v.shape) for v in a.values()}  # Conv1D's (in, out)
    for method in STATIC_MERGES:
        name = add_static_merge(model, ["a", "b"], method, params={"lambda": lam, "density": 1.0})
        got, factor = _delta_weights(model, name), (3 if method in ("cat", "svd") else 1.5) * lam  # ΔW_b = 2 ΔW_a
        for k in a:
            assert torch.allclose(got[k], factor * a[k], atol=1e-5), (method, k, float((got[k] - factor * a[k]).abs().max()))
        model.delete_adapter(name)
