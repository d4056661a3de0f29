"""Building blocks against transformers' definitions, and the parameter layout pinned."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import genir_jax as gj
from genir_jax.checkpoints.hf import hf_tensor_specs
from genir_jax.core.modules import relative_position_bucket
from tests.core.test_config import FLAN_T5_SMALL, T5_LARGE, T5_SMALL


@settings(max_examples=60, deadline=None)
@given(
    num_buckets=st.integers(4, 128),
    extra_distance=st.integers(1, 400),
    bidirectional=st.booleans(),
    positions=st.lists(st.integers(-2000, 2000), min_size=1, max_size=64),
)
def test_relative_position_bucket_matches_transformers(num_buckets, extra_distance, bidirectional, positions):
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    max_distance = num_buckets + extra_distance
    relative = np.asarray(positions)
    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(torch.as_tensor(relative), bidirectional, num_buckets,
                                                   max_distance).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert ours.min() >= 0 and ours.max() < num_buckets


def test_every_relative_position_up_to_distance_matches_transformers():
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-600, 601)
    for buckets, distance in ((32, 128), (8, 12), (64, 40), (16, 500)):
        for bidirectional in (True, False):
            theirs = T5Attention._relative_position_bucket(torch.as_tensor(relative), bidirectional, buckets,
                                                           distance).numpy()
            np.testing.assert_array_equal(relative_position_bucket(relative, bidirectional, buckets, distance),
                                          theirs)


def _torch_parameter_count(data):
    import torch
    from transformers import T5Config as HFConfig, T5ForConditionalGeneration

    with torch.device("meta"):
        model = T5ForConditionalGeneration(HFConfig(**data))
    if data.get("tie_word_embeddings", True) is False:
        return sum(p.numel() for p in model.parameters()) + model.lm_head.weight.numel()
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, data, expected", [
    ("t5-small", T5_SMALL, 60_506_624),
    ("t5-large", T5_LARGE, 737_668_096),
    ("flan-t5-small", FLAN_T5_SMALL, 76_961_152),
])
def test_parameter_count_and_layout_pinned(name, data, expected):
    config = gj.T5Config.from_hf_dict(data)
    shapes = gj.param_shapes(config)
    leaves = [leaf for leaf in __import__("jax").tree_util.tree_leaves(shapes)]
    ours = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    assert ours == expected == _torch_parameter_count(data)
    # our stacked layout holds exactly the elements of transformers' tensors
    assert ours == sum(int(np.prod(spec.hf_shape)) for spec in hf_tensor_specs(config))
    layers = shapes["decoder"]["layers"]
    d, h, k, f = config.d_model, config.num_heads, config.d_kv, config.d_ff
    assert layers["self_attn"]["query"].shape == (config.num_decoder_layers, d, h, k)
    assert layers["cross_attn"]["out"].shape == (config.num_decoder_layers, h, k, d)
    assert layers["mlp"]["wo"].shape == (config.num_decoder_layers, f, d)


def test_logical_axes_name_every_parameter():
    import jax
    from jax.sharding import PartitionSpec

    config = gj.T5Config.from_hf_dict(FLAN_T5_SMALL)
    axes = gj.logical_axes(config)
    shapes = gj.param_shapes(config)
    flat_axes = jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_shapes = jax.tree_util.tree_leaves(shapes)
    assert len(flat_axes) == len(flat_shapes)
    for spec, shape in zip(flat_axes, flat_shapes):
        assert len(spec) == len(shape.shape) and all(isinstance(name, str) for name in spec)
    assert axes["lm_head"] == PartitionSpec("embed", "vocab")
    assert axes["encoder"]["layers"]["mlp"]["wi_0"] == PartitionSpec("layers", "embed", "mlp")


def test_init_matches_transformers_initialisation_scales():
    config = gj.t5_v1_1(vocab_size=512, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_heads=4)
    params = gj.init_params(config, 0)
    layers = params["encoder"]["layers"]
    expected_std = {
        ("self_attn", "query"): (64 * 16) ** -0.5, ("self_attn", "key"): 64 ** -0.5,
        ("self_attn", "out"): (4 * 16) ** -0.5, ("mlp", "wi_0"): 64 ** -0.5, ("mlp", "wo"): 256 ** -0.5,
    }
    for (block, name), std in expected_std.items():
        assert abs(float(np.std(layers[block][name])) / std - 1) < 0.1, (block, name)
    assert abs(float(np.std(params["shared"])) - 1) < 0.05
    np.testing.assert_array_equal(layers["mlp_norm"]["scale"], 1.0)
