"""`DecoderConfig` reads transformers' GPT2Config / LlamaConfig / Qwen2Config names and refuses what it cannot run."""

from __future__ import annotations

import pytest

from genir_jax.base.errors import ConfigError
from genir_jax.core.decoder_config import DecoderConfig

LLAMA = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 128,
         "tie_word_embeddings": False, "some_unknown_field": [1, 2]}


def test_rope_theta_from_transformers_4_and_5():
    v4 = DecoderConfig.from_hf_dict({**LLAMA, "rope_theta": 500000.0, "rope_scaling": None})
    v5 = DecoderConfig.from_hf_dict({**LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    assert v4 == v5 and v4.rope_theta == 500000.0
    assert (v4.num_kv_heads, v4.d_kv, v4.d_ff, v4.norm_epsilon) == (2, 8, 64, 1e-5)


def test_to_hf_dict_round_trips_and_keeps_unknown_fields():
    config = DecoderConfig.from_hf_dict({**LLAMA, "head_dim": 16, "attention_bias": True})
    assert (config.d_kv, config.qkv_bias, config.out_bias) == (16, True, True)
    data = config.to_hf_dict()
    assert data["some_unknown_field"] == [1, 2] and data["rope_parameters"]["rope_theta"] == config.rope_theta
    assert DecoderConfig.from_hf_dict(data) == config
    gpt2 = DecoderConfig.from_hf_dict({"model_type": "gpt2", "vocab_size": 50, "n_embd": 24, "n_layer": 1,
                                       "n_head": 3, "n_positions": 16})
    assert (gpt2.d_ff, gpt2.d_kv, gpt2.activation, gpt2.tie_word_embeddings) == (96, 8, "gelu_new", True)
    assert DecoderConfig.from_hf_dict(gpt2.to_hf_dict()) == gpt2


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "only default rotary positions"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "only default rotary positions"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "sliding-window attention"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"hidden_size": None}, "missing field 'hidden_size'"),
    ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings' must be true or false"),
    ({"model_type": "mistral"}, "'mistral' is not a supported decoder-only model"),
    ({"hidden_act": "tanh"}, "activation 'tanh' is not supported"),
])
def test_unsupported_configs_are_refused_naming_the_field(change, message):
    with pytest.raises(ConfigError, match=f"my/config.json: .*{message}"):
        DecoderConfig.from_hf_dict({**LLAMA, **change}, source="my/config.json")


def test_gpt2_options_that_change_the_computation_are_refused():
    with pytest.raises(ConfigError, match="'scale_attn_by_inverse_layer_idx' = True is not supported"):
        DecoderConfig.from_hf_dict({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True})
