"""Decoder-only Hugging Face checkpoints: load (single, sharded, GPT2Model names), save back so that
transformers loads the same model, and refuse non-finite weights naming the tensor."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from genir_jax.base.errors import CheckpointError
from genir_jax.checkpoints.decoder_hf import load_decoder_only, save_decoder_only
from genir_jax.core import decoder_only as do
from tests.decoder_fixtures import build_torch_causal_lm, padded_causal_batch, save_causal_lm, torch_causal_logits
from tests.hf_fixtures import poison_safetensors

KINDS = ("gpt2", "llama", "qwen2")


def _params_equal(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_save_round_trips_through_transformers(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    torch_model = build_torch_causal_lm(kind, seed=20)
    model = load_decoder_only(save_causal_lm(torch_model, tmp_path / "hf"))
    saved = save_decoder_only(tmp_path / "ours", model)
    data = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert data["model_type"] == kind and data["architectures"] == [type(torch_model).__name__]
    reloaded = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager").eval()
    ids, mask = padded_causal_batch(model.config.vocab_size, [5, 3], "left", seed=0)
    positions = np.asarray(do.positions_from_mask(mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(torch_causal_logits(reloaded, ids, mask, positions)[real],
                               torch_causal_logits(torch_model, ids, mask, positions)[real], atol=1e-5)
    again = load_decoder_only(saved)
    assert again.config == model.config
    _params_equal(again.params, model.params)


def test_config_fields_read_as_transformers_names_them(tmp_path):
    gpt2 = load_decoder_only(save_causal_lm(build_torch_causal_lm("gpt2", n_inner=40), tmp_path / "g"))
    assert (gpt2.config.d_model, gpt2.config.d_ff, gpt2.config.max_position_embeddings) == (32, 40, 64)
    assert gpt2.config.tie_word_embeddings and "lm_head" not in gpt2.params
    llama = load_decoder_only(save_causal_lm(build_torch_causal_lm("llama"), tmp_path / "l"))
    assert (llama.config.num_kv_heads, llama.config.rope_theta, llama.config.tie_word_embeddings) == (2, 500.0, False)
    assert llama.params["layers"]["attn"]["key"].shape == (2, 32, 2, 8) and "query_bias" not in llama.params["layers"]["attn"]
    qwen = load_decoder_only(save_causal_lm(build_torch_causal_lm("qwen2"), tmp_path / "q"))
    assert qwen.config.qkv_bias and not qwen.config.out_bias and "lm_head" not in qwen.params
    assert qwen.params["layers"]["attn"]["value_bias"].shape == (2, 1, 8)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sharded_checkpoints_load_identically(tmp_path, kind):
    torch_model = build_torch_causal_lm(kind, seed=21)
    single = load_decoder_only(save_causal_lm(torch_model, tmp_path / "single"))
    sharded_dir = save_causal_lm(torch_model, tmp_path / "sharded", fmt="sharded")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    _params_equal(load_decoder_only(sharded_dir).params, single.params)
    ours = save_decoder_only(tmp_path / "ours", single, max_shard_bytes=20_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    _params_equal(load_decoder_only(ours).params, single.params)


def test_gpt2_model_names_without_the_transformer_prefix_load(tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = save_causal_lm(build_torch_causal_lm("gpt2", seed=22), tmp_path / "g")
    reference = load_decoder_only(directory)
    path = directory / "model.safetensors"
    tensors = {name.removeprefix("transformer."): t for name, t in load_file(str(path)).items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((64, 64), np.float32))  # the causal-mask buffer old files hold
    save_file(tensors, str(path), metadata={"format": "pt"})
    _params_equal(load_decoder_only(directory).params, reference.params)


@pytest.mark.parametrize("kind, tensor", [("llama", "model.layers.1.mlp.up_proj.weight"),
                                          ("gpt2", "transformer.h.0.attn.c_attn.weight")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, kind, tensor):
    directory = save_causal_lm(build_torch_causal_lm(kind), tmp_path / kind)
    poison_safetensors(directory, tensor, float("nan"), index=-1)  # the last element: GPT-2's value third
    with pytest.raises(CheckpointError, match=rf"tensor '{tensor}(\[v\])?' holds 1 non-finite value"):
        load_decoder_only(directory)


def test_missing_and_misshapen_tensors_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    directory = save_causal_lm(build_torch_causal_lm("llama"), tmp_path / "l")
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(32, 32\) but "
                                              r"config.json implies \(16, 32\)"):
        load_decoder_only(directory)
    del tensors["lm_head.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor.*'lm_head.weight'"):
        load_decoder_only(directory)


def test_the_t5_loader_points_decoder_only_checkpoints_to_their_loader(tmp_path):
    from genir_jax.base.errors import ConfigError
    from genir_jax.checkpoints.hf import load_pretrained

    directory = save_causal_lm(build_torch_causal_lm("qwen2"), tmp_path / "q")
    with pytest.raises(ConfigError, match="model_type 'qwen2' is a decoder-only model.*load_decoder_only"):
        load_pretrained(directory)
