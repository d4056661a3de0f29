"""T5Config reads the config.json of every T5 variant and writes one transformers reads identically."""

from __future__ import annotations

import json

import jax
import pytest

import genir_jax as gj
from genir_jax.core.config import T5Config

# Abridged copies of real hub config.json files (fields that matter kept verbatim).
T5_SMALL = {"architectures": ["T5ForConditionalGeneration"], "d_ff": 2048, "d_kv": 64, "d_model": 512,
            "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
            "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
            "num_heads": 8, "num_layers": 6, "output_past": True, "pad_token_id": 0,
            "relative_attention_num_buckets": 32, "vocab_size": 32128}
T5_LARGE = {**T5_SMALL, "d_ff": 4096, "d_model": 1024, "num_heads": 16, "num_layers": 24}
FLAN_T5_SMALL = {"architectures": ["T5ForConditionalGeneration"], "d_ff": 1024, "d_kv": 64, "d_model": 512,
                 "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
                 "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
                 "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
                 "num_decoder_layers": 8, "num_heads": 6, "num_layers": 8, "output_past": True, "pad_token_id": 0,
                 "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
                 "tie_word_embeddings": False, "transformers_version": "4.23.1", "use_cache": True,
                 "vocab_size": 32128}
MT5_SMALL = {"architectures": ["MT5ForConditionalGeneration"], "d_ff": 1024, "d_kv": 64, "d_model": 512,
             "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
             "initializer_factor": 1.0, "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06,
             "model_type": "mt5", "num_decoder_layers": 8, "num_heads": 6, "num_layers": 8, "pad_token_id": 0,
             "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "tokenizer_class": "T5Tokenizer",
             "vocab_size": 250112}
# What transformers 5.x writes for a v1.1 model: tie flag forced true, rescale recorded separately.
HF5_V1_1 = {**FLAN_T5_SMALL, "tie_word_embeddings": True, "scale_decoder_outputs": False}

HUB = {"t5-small": T5_SMALL, "t5-large": T5_LARGE, "flan-t5-small": FLAN_T5_SMALL, "mt5-small": MT5_SMALL,
       "hf5-v1_1": HF5_V1_1}


def test_reads_v1_0():
    config = T5Config.from_hf_dict(T5_SMALL)
    assert config.feed_forward_proj == "relu" and not config.is_gated_act and config.dense_act_fn == "relu"
    assert config.tie_word_embeddings and config.scale_decoder_outputs
    assert config.num_decoder_layers == 6 and config.relative_attention_max_distance == 128


def test_reads_v1_1_flan_and_mt5():
    for data in (FLAN_T5_SMALL, MT5_SMALL):
        config = T5Config.from_hf_dict(data)
        assert config.is_gated_act and config.dense_act_fn == "gelu_new"
        assert not config.tie_word_embeddings and not config.scale_decoder_outputs
    assert T5Config.from_hf_dict(MT5_SMALL).model_type == "mt5"
    hf5 = T5Config.from_hf_dict(HF5_V1_1)
    assert hf5.tie_word_embeddings and not hf5.scale_decoder_outputs  # tying is settled by the weights


@pytest.mark.parametrize("name", sorted(HUB))
def test_written_config_is_read_identically_by_transformers(name):
    from transformers import AutoConfig

    ours = T5Config.from_hf_dict(HUB[name])
    written = ours.to_hf_dict()
    assert T5Config.from_hf_dict(written) == ours
    theirs = AutoConfig.for_model(**written)
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
                  "feed_forward_proj", "dense_act_fn", "is_gated_act", "scale_decoder_outputs",
                  "decoder_start_token_id"):
        assert getattr(theirs, field) == getattr(ours, field), field
    assert theirs.model_type == ours.model_type


def test_json_file_roundtrip_keeps_unknown_fields(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(T5_SMALL))
    config = T5Config.from_json_file(path)
    config.to_json_file(tmp_path / "out.json")
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["n_positions"] == 512 and written["output_past"] is True
    assert T5Config.from_json_file(tmp_path / "out.json") == config


def test_config_is_a_static_jit_argument():
    config = T5Config.from_hf_dict(T5_SMALL)
    assert hash(config) == hash(T5Config.from_hf_dict(dict(T5_SMALL)))
    assert jax.jit(lambda c, x: x * c.d_model, static_argnums=0)(config, 2) == 1024


@pytest.mark.parametrize("field, value, message", [
    ("d_model", 0, "field 'd_model' must be a positive integer"),
    ("num_heads", 2.5, "field 'num_heads' must be a positive integer"),
    ("feed_forward_proj", "gated-foo", "field 'feed_forward_proj' = 'gated-foo' is not supported"),
    ("tie_word_embeddings", "yes", "field 'tie_word_embeddings' must be true or false"),
    ("model_type", "longt5", "field 'model_type' = 'longt5' is not supported"),
    ("relative_attention_num_buckets", 2, "field 'relative_attention_num_buckets' must be >= 4"),
    ("pad_token_id", 40000, r"field 'pad_token_id' must be a token id in \[0, vocab_size=32128\)"),
])
def test_invalid_fields_are_named(field, value, message):
    with pytest.raises(gj.ConfigError, match=rf"^my/config.json: {message}"):
        T5Config.from_hf_dict({**T5_SMALL, field: value}, source="my/config.json")


def test_direct_construction_validates():
    with pytest.raises(gj.ConfigError, match="T5Config: field 'feed_forward_proj'"):
        T5Config(feed_forward_proj="swiglu")
    assert T5Config(num_layers=4).num_decoder_layers == 4
