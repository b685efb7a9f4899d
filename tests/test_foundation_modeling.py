"""Foundation: loading any local causal LM (nf4 / int8 / none), LoRA targets, the model
fingerprint, and interoperability with stock transformers and peft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.modeling import (
    _fingerprint_cache,
    attach_lora,
    check_model_dir,
    default_target_modules,
    is_quantized_4bit,
    load_adapter,
    load_base_model,
    load_tokenizer,
    model_fingerprint,
    pick_device,
    quantization_config,
    save_adapter,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def layer_types(model) -> dict[str, str]:
    """Class name of every decoder-block projection, by module name."""
    return {name: type(m).__name__ for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in LLAMA_TARGETS + ["c_attn", "c_proj", "c_fc"]}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny GPT-2 with random weights (Conv1D projections), with the tiny tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(tiny_model_dir)
    out = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=128,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's architecture and tokenizer with re-initialised weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("other-base")
    torch.manual_seed(1234)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir)).save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


# -- quantization ------------------------------------------------------------------------


def test_nf4_gives_bitsandbytes_4bit_layers(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_base_model(tiny_model_dir, "nf4")
    types = layer_types(model)
    assert types and set(types.values()) == {"Linear4bit"}, types
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(m.weight.quant_type == "nf4" for m in four_bit)
    assert all(m.weight.dtype == torch.uint8 for m in four_bit)  # packed 4-bit storage
    assert is_quantized_4bit(model)
    plain = load_base_model(tiny_model_dir, "none")
    assert model.get_memory_footprint() < 0.6 * plain.get_memory_footprint()


def test_int8_gives_bitsandbytes_8bit_layers(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_base_model(tiny_model_dir, "int8")
    types = layer_types(model)
    assert types and set(types.values()) == {"Linear8bitLt"}, types
    assert all(m.weight.dtype == torch.int8 for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt))
    assert not is_quantized_4bit(model)
    tok = load_tokenizer(tiny_model_dir)
    logits = model(**tok("The teacher at the school asked what apple is. Answer:", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()


def test_none_gives_plain_linear(tiny_model_dir):
    model = load_base_model(tiny_model_dir, "none")
    types = layer_types(model)
    assert types and set(types.values()) == {"Linear"}, types
    assert all(type(m) is torch.nn.Linear for name, m in model.named_modules() if name in types)
    assert not is_quantized_4bit(model)
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.use_cache is False


def test_unknown_quantization_is_one_clear_line():
    with pytest.raises(FedmoeError) as exc:
        quantization_config("fp3")
    msg = str(exc.value)
    assert "\n" not in msg and "fp3" in msg and all(q in msg for q in ("nf4", "int8", "none"))


def test_bad_model_dirs(tmp_path):
    with pytest.raises(FedmoeError, match="model directory not found"):
        load_base_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedmoeError, match="no config.json"):
        check_model_dir(tmp_path / "empty")
    with pytest.raises(FedmoeError, match="no config.json"):
        model_fingerprint(tmp_path / "empty")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_asked_on_cpu_machine():
    assert pick_device("auto").type == "cpu"
    with pytest.raises(FedmoeError, match="CUDA is not available"):
        pick_device("cuda:0")


# -- LoRA targets ----------------------------------------------------------------------------


def test_llama_target_modules(tiny_model_dir):
    model = load_base_model(tiny_model_dir, "nf4")
    assert default_target_modules(model) == LLAMA_TARGETS
    peft_model = attach_lora(model, rank=4)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(LLAMA_TARGETS)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_gpt2_target_modules(gpt2_dir, quant):
    from fedmoe.shared.delta import AdapterSpec, LoraDelta

    model = load_base_model(gpt2_dir, quant)
    assert model.config.model_type == "gpt2"
    assert default_target_modules(model) == ["c_attn", "c_proj", "c_fc"]
    if quant == "nf4":
        assert set(layer_types(model).values()) == {"Linear4bit"}
    peft_model = attach_lora(model, rank=4)
    spec = AdapterSpec.from_peft_model(peft_model)
    assert len(spec.modules) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    attn = next(v for k, v in spec.modules.items() if k.endswith("h.0.attn.c_attn"))
    assert attn == (64, 192)  # Conv1D's (in, out), not the transposed weight shape
    delta = LoraDelta.from_peft_model(peft_model, "fp")
    delta.validate(spec, "fp")


def test_unknown_family_adapts_every_block_linear(gpt2_dir):
    model = load_base_model(gpt2_dir, "none")
    model.config.model_type = "somethingnew"
    assert default_target_modules(model) == ["c_attn", "c_proj", "c_fc"]  # from the modules, never lm_head


def test_rank_must_be_positive(tiny_model_dir):
    with pytest.raises(FedmoeError, match="rank"):
        attach_lora(load_base_model(tiny_model_dir, "none"), rank=0)


# -- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_content_based(tiny_model_dir, other_model_dir, tmp_path):
    first = model_fingerprint(tiny_model_dir)
    assert first.startswith("sha256:")
    _fingerprint_cache.clear()
    assert model_fingerprint(tiny_model_dir) == first  # recomputed from the files, same answer
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_fingerprint(copy) == first  # a copy elsewhere is the same base
    # Library-version fields in config.json do not change which base it is.
    cfg = json.loads((copy / "config.json").read_text())
    cfg["transformers_version"] = "0.0.1"
    (copy / "config.json").write_text(json.dumps(cfg))
    _fingerprint_cache.clear()
    assert model_fingerprint(copy) == first
    # Different weights, same architecture: a different base.
    assert model_fingerprint(other_model_dir) != first
    # Same weights, a changed config value that matters: different.
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 10
    (copy / "config.json").write_text(json.dumps(cfg))
    _fingerprint_cache.clear()
    assert model_fingerprint(copy) != first


def test_fingerprint_sees_a_rewritten_weight_file(tiny_model_dir, other_model_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    before = model_fingerprint(copy)
    shutil.copy(other_model_dir / "model.safetensors", copy / "model.safetensors")
    assert model_fingerprint(copy) == model_fingerprint(other_model_dir) != before


# -- stock transformers / peft ----------------------------------------------------------


def test_stock_transformers_load_the_tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert model.config.model_type == "llama"
    text = "The teacher at the school asked what apple is. Answer: fruit"
    ids = tok(text, return_tensors="pt")
    assert tok.decode(ids["input_ids"][0], skip_special_tokens=True) == text
    assert tok.eos_token is not None and tok.pad_token is not None
    with torch.no_grad():
        out = model(**ids, labels=ids["input_ids"])
    assert torch.isfinite(out.loss) and float(out.loss) < 5.0  # pretrained: far below ln(vocab) ~ 7.6


def test_trained_adapter_loads_with_stock_peft(tiny_model_dir, other_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedmoe.client.trainer import SiteTrainer
    from fedmoe.shared.data import Record
    from fedmoe.shared.training import TrainConfig

    trainer = SiteTrainer(tiny_model_dir, quant="none", rank=4)
    records = [Record("The teacher asked what zorvat is. Answer:", " kidney")] * 8
    trainer.train(records, TrainConfig(steps=5, batch_size=4, seed=0))
    adapter = save_adapter(trainer.model, tmp_path / "adapter", trainer.fingerprint, domain="medicine")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "fedmoe_adapter.json").read_text())["base_fingerprint"] == trainer.fingerprint

    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter)).eval()
    ids = trainer.tokenizer("The teacher asked what zorvat is. Answer:", return_tensors="pt")
    with torch.no_grad():
        ours = trainer.model(**ids).logits
        theirs = stock(**ids).logits
        base = stock.get_base_model()
        with stock.disable_adapter():
            plain = stock(**ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter changes the output
    assert base is not None

    # fedmoe's loader accepts it on the same base and refuses it on another.
    reloaded = load_adapter(load_base_model(tiny_model_dir, "none"), adapter, model_fingerprint(tiny_model_dir))
    with torch.no_grad():
        assert torch.allclose(reloaded(**ids).logits, ours, atol=1e-5)
    with pytest.raises(FedmoeError, match="made for base model"):
        load_adapter(load_base_model(other_model_dir, "none"), adapter, model_fingerprint(other_model_dir))


def test_adapter_that_does_not_fit(gpt2_dir, tmp_path, tiny_model_dir):
    """A stock adapter (no fedmoe metadata) for another architecture: a one-line error."""
    gpt2 = attach_lora(load_base_model(gpt2_dir, "none"), rank=4)
    gpt2.save_pretrained(str(tmp_path / "gpt2-adapter"))
    with pytest.raises(FedmoeError) as exc:
        load_adapter(load_base_model(tiny_model_dir, "none"), tmp_path / "gpt2-adapter", model_fingerprint(tiny_model_dir))
    assert "\n" not in str(exc.value)
    with pytest.raises(FedmoeError, match="no adapter_config.json"):
        load_adapter(load_base_model(tiny_model_dir, "none"), tmp_path)
