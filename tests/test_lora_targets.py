"""LoRA targets come from the architecture's own linear layers, whatever the family."""

from __future__ import annotations

import pytest
import torch

from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.modeling import default_target_modules

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32)


def tiny(config_cls: str, model_cls: str, **kwargs):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))


@pytest.mark.parametrize("config_cls, model_cls", [
    ("LlamaConfig", "LlamaForCausalLM"),
    ("Qwen2Config", "Qwen2ForCausalLM"),
    ("Gemma3TextConfig", "Gemma3ForCausalLM"),
])
def test_llama_like_families_adapt_attention_and_mlp(config_cls, model_cls):
    extra = {"head_dim": 8} if config_cls.startswith("Gemma") else {}
    assert default_target_modules(tiny(config_cls, model_cls, **SMALL, **extra)) == PROJ


def test_gpt2_adapts_its_conv1d_projections():
    model = tiny("GPT2Config", "GPT2LMHeadModel", vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    assert default_target_modules(model) == ["c_attn", "c_proj", "c_fc"]


def test_names_not_model_type_decide():
    model = tiny("LlamaConfig", "LlamaForCausalLM", **SMALL)
    model.config.model_type = "gpt2"  # a wrong label changes nothing: the modules are read
    assert default_target_modules(model) == PROJ


def test_lm_head_and_peft_layers_never_targeted():
    from peft import LoraConfig, get_peft_model

    model = tiny("LlamaConfig", "LlamaForCausalLM", **SMALL)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=PROJ, task_type="CAUSAL_LM"))
    assert default_target_modules(peft_model) == PROJ


def test_no_block_linears_is_one_line_error():
    with pytest.raises(FedmoeError, match="no linear layers"):
        default_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))
