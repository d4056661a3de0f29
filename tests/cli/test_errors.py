"""Bad checkpoints give clear errors naming the file and the tensor or field."""

from __future__ import annotations

import json

import pytest

import genir_jax as gj

SMALL = dict(feed_forward_proj="relu")


def _edit_config(directory, **changes):
    """Rewrite the checkpoint's config.json with some fields changed."""
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(gj.CheckpointError, match=r"nope: checkpoint directory does not exist"):
        gj.load_pretrained(missing)


def test_hub_id_not_in_cache(tmp_path):
    with pytest.raises(gj.CheckpointError, match=r"AnReu/not-a-model.*not a hub id in the local Hugging Face cache"):
        gj.load_pretrained("AnReu/not-a-model", cache_dir=tmp_path / "empty-cache")


def test_hub_id_in_local_cache_loads(hf_checkpoint, tmp_path):
    """A hub id resolves to its snapshot in the local cache (layout of huggingface_hub), no network."""
    import shutil

    directory, _ = hf_checkpoint("cached", **SMALL)
    cache = tmp_path / "hub-cache"
    repo = cache / "models--AnReu--DSI-tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(directory, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model = gj.load_pretrained("AnReu/DSI-tiny", cache_dir=cache)
    assert model.config.vocab_size == 128 and model.path.endswith(commit)


def test_missing_config(hf_checkpoint):
    directory, _ = hf_checkpoint("noconfig", **SMALL)
    (directory / "config.json").unlink()
    with pytest.raises(gj.ConfigError, match=r"config.json: config file not found"):
        gj.load_pretrained(directory)


def test_missing_weights(hf_checkpoint):
    directory, _ = hf_checkpoint("noweights", **SMALL)
    (directory / "model.safetensors").unlink()
    with pytest.raises(gj.CheckpointError, match=r"noweights: no weights found"):
        gj.load_pretrained(directory)


def test_missing_tensor(hf_checkpoint):
    import torch
    from safetensors.torch import load_file, save_file

    directory, _ = hf_checkpoint("missing", **SMALL)
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    with pytest.raises(gj.CheckpointError,
                       match=r"model.safetensors: missing tensor\(s\) 'decoder.block.1.layer.2.DenseReluDense.wo.weight'"):
        gj.load_pretrained(directory)
    del torch


def test_untied_config_without_lm_head(hf_checkpoint):
    directory, _ = hf_checkpoint("nolmhead", **SMALL)
    _edit_config(directory, tie_word_embeddings=False)
    with pytest.raises(gj.CheckpointError, match=r"missing tensor 'lm_head.weight'.*tie_word_embeddings=false"):
        gj.load_pretrained(directory)


def test_shape_contradicts_config(hf_checkpoint):
    directory, _ = hf_checkpoint("shape", **SMALL)
    _edit_config(directory, d_ff=48)
    with pytest.raises(gj.CheckpointError,
                       match=r"model.safetensors: tensor 'encoder.block.0.layer.1.DenseReluDense.wi.weight' has shape "
                             r"\(64, 32\) but config.json implies \(48, 32\).*d_ff=48"):
        gj.load_pretrained(directory)


def test_vocab_size_contradicts_config(hf_checkpoint):
    directory, _ = hf_checkpoint("vocab", **SMALL)
    _edit_config(directory, vocab_size=200)
    with pytest.raises(gj.CheckpointError, match=r"tensor 'shared.weight' has shape \(128, 32\).*vocab_size=200"):
        gj.load_pretrained(directory)


@pytest.mark.parametrize("value", ["gated-swiglu", "relu-gated", "gated-gelu-new", "tanh"])
def test_unknown_feed_forward_proj(hf_checkpoint, value):
    directory, _ = hf_checkpoint("ffp", **SMALL)
    _edit_config(directory, feed_forward_proj=value)
    with pytest.raises(gj.ConfigError, match=rf"config.json: field 'feed_forward_proj' = '{value}' is not supported"):
        gj.load_pretrained(directory)


def test_unsupported_model_type(hf_checkpoint):
    directory, _ = hf_checkpoint("umt5", **SMALL)
    _edit_config(directory, model_type="umt5")
    with pytest.raises(gj.ConfigError, match=r"config.json: field 'model_type' = 'umt5' is not supported"):
        gj.load_pretrained(directory)


def test_invalid_json_config(hf_checkpoint):
    directory, _ = hf_checkpoint("badjson", **SMALL)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(gj.ConfigError, match=r"config.json: not valid JSON"):
        gj.load_pretrained(directory)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(hf_checkpoint, damage):
    directory, _ = hf_checkpoint("corrupt", **SMALL)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(gj.CheckpointError, match=r"model.safetensors: corrupt or unreadable safetensors file"):
        gj.load_pretrained(directory)


def test_shard_index_pointing_to_missing_file(hf_checkpoint):
    directory, _ = hf_checkpoint("shards", fmt="sharded", **SMALL)
    shard = sorted(directory.glob("model-*-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(gj.CheckpointError, match=rf"model.safetensors.index.json: tensor '.*' is mapped to missing "
                                                 rf"shard file .*{shard.name}"):
        gj.load_pretrained(directory)


def test_torch_bin_with_arbitrary_pickle_is_refused(hf_checkpoint, tmp_path):
    """weights_only=True: a .bin that would execute code on unpickling is rejected, not run."""
    import pickle

    directory, _ = hf_checkpoint("evil", fmt="bin", **SMALL)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import torch

    torch.save({"shared.weight": Exploit()}, directory / "pytorch_model.bin", pickle_module=pickle)
    with pytest.raises(gj.CheckpointError, match=r"pytorch_model.bin: cannot be read as a weights-only"):
        gj.load_pretrained(directory)
    assert not marker.exists()


def test_tokenizer_larger_than_vocabulary(hf_checkpoint, t5_tokenizer):
    directory, _ = hf_checkpoint("tokvocab", tokenizer=t5_tokenizer, **SMALL)
    with pytest.raises(gj.CheckpointError, match=r"tokenizer has 32100 tokens but the model's vocab_size is 128"):
        gj.load_pretrained(directory)
    assert gj.load_pretrained(directory, load_tokenizer=False).tokenizer is None
