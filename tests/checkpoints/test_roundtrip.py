"""Checkpoint export: ours -> HF gives the same logits; HF -> ours -> HF gives identical tensors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors import safe_open

import genir_jax as gj
from tests.hf_fixtures import padded_batch, torch_logits


def _read_safetensors(directory):
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(str(directory / name), framework="np") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_ours_to_transformers_gives_same_logits(tmp_path, variant):
    from transformers import AutoModelForSeq2SeqLM

    make = gj.t5_v1_0 if variant == "v1_0" else gj.t5_v1_1
    config = make(vocab_size=96, d_model=24, d_kv=6, d_ff=40, num_layers=2, num_decoder_layers=3, num_heads=4,
                  relative_attention_num_buckets=16, relative_attention_max_distance=30)
    model = gj.PretrainedModel(config=config, params=gj.init_params(config, 7))
    out_dir = gj.save_pretrained(tmp_path / "exported", model)
    torch_model = AutoModelForSeq2SeqLM.from_pretrained(out_dir).eval()
    ids, mask, dec = padded_batch(config.vocab_size, [20, 9, 14], decoder_steps=3)
    ours = np.asarray(gj.forward(config, model.params, ids, mask, dec))
    np.testing.assert_allclose(torch_logits(torch_model, ids, mask, dec), ours, atol=1e-4)
    # and back: loading our export gives the same config and bit-identical params
    reloaded = gj.load_pretrained(out_dir)
    assert reloaded.config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded.params, model.params)


@pytest.mark.parametrize("settings", [
    dict(feed_forward_proj="relu", tie_word_embeddings=True),
    dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3),
], ids=["v1_0", "v1_1"])
@pytest.mark.parametrize("fmt", ["safetensors", "sharded"])
def test_transformers_to_ours_to_transformers_is_identical(hf_checkpoint, tmp_path, settings, fmt):
    directory, _ = hf_checkpoint("orig", fmt=fmt, **settings)
    model = gj.load_pretrained(directory)
    out_dir = tmp_path / "again"
    gj.save_pretrained(out_dir, model, max_shard_bytes=20_000 if fmt == "sharded" else None)
    original, exported = _read_safetensors(directory), _read_safetensors(out_dir)
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


def test_export_keeps_tokenizer_and_unknown_config_fields(hf_checkpoint, tmp_path, t5_tokenizer):
    directory, _ = hf_checkpoint("tok", tokenizer=t5_tokenizer, vocab_size=32128, d_model=16, d_kv=4, d_ff=32,
                                 num_heads=2)
    config_path = directory / "config.json"
    data = json.loads(config_path.read_text())
    data["task_specific_params"] = {"summarization": {"prefix": "summarize: "}}
    config_path.write_text(json.dumps(data))
    model = gj.load_pretrained(directory)
    assert model.tokenizer is not None and len(model.tokenizer) == 32100
    out_dir = gj.save_pretrained(tmp_path / "out", model)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["task_specific_params"] == data["task_specific_params"]
    again = gj.load_pretrained(out_dir)
    text = "Which NFL team represented the AFC at Super Bowl 50?"
    assert again.tokenizer(text).input_ids == model.tokenizer(text).input_ids


def test_bfloat16_export(tmp_path):
    config = gj.t5_v1_1(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    model = gj.PretrainedModel(config=config, params=gj.init_params(config, 1))
    out = gj.save_pretrained(tmp_path / "bf16", model, dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    again = gj.load_pretrained(out, dtype="auto")
    assert str(again.params["shared"].dtype) == "bfloat16"


def test_save_replaces_earlier_weights_atomically(tmp_path):
    config = gj.t5_v1_0(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    first = gj.PretrainedModel(config=config, params=gj.init_params(config, 1))
    second = gj.PretrainedModel(config=config, params=gj.init_params(config, 2))
    target = tmp_path / "ckpt"
    gj.save_pretrained(target, first, max_shard_bytes=2_000)
    gj.save_pretrained(target, second)
    assert not list(target.glob("model-*-of-*.safetensors")) and not (target / "model.safetensors.index.json").exists()
    jax.tree_util.tree_map(np.testing.assert_array_equal, gj.load_pretrained(target).params, second.params)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".genir-save-")]
