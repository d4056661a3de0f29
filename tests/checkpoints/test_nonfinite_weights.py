"""A checkpoint with a NaN or an infinity in a weight is refused at load, naming the tensor and the count:
every command loads through `load_pretrained`, so none computes NaN logits and reports them as results."""

import math

import pytest

import genir_jax as gj
from genir_jax.base.errors import CheckpointError

TENSOR = "decoder.block.1.layer.2.DenseReluDense.wo.weight"


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_is_refused_with_its_name(hf_checkpoint, fmt, value):
    directory, _ = hf_checkpoint(f"bad-{fmt}", fmt=fmt, nonfinite={TENSOR: value})
    with pytest.raises(CheckpointError, match=rf"tensor '{TENSOR}' holds 1 non-finite value\(s\)"):
        gj.load_pretrained(directory, load_tokenizer=False)


def test_non_finite_weights_are_counted(hf_checkpoint):
    directory, _ = hf_checkpoint("two", nonfinite={"shared.weight": math.nan})
    from tests.hf_fixtures import poison_safetensors

    poison_safetensors(directory, "shared.weight", math.inf, index=5)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'shared.weight' holds 2 non-finite"):
        gj.load_pretrained(directory, load_tokenizer=False)


def test_non_finite_weight_is_refused_when_read_sharded(hf_checkpoint):
    """The slice-by-slice reader (a partitioner) checks each slice it reads."""
    from genir_jax.scale.partitioning import Partitioner

    directory, _ = hf_checkpoint("sharded-read", nonfinite={TENSOR: math.nan})
    with pytest.raises(CheckpointError, match=rf"tensor '{TENSOR}' holds 1 non-finite value\(s\) \(NaN or inf\) "
                                             r"in the slice \[\d+:\d+, \d+:\d+\] read"):
        gj.load_pretrained(directory, load_tokenizer=False, partitioner=Partitioner("model=2"))


def test_finite_checkpoint_still_loads(hf_checkpoint):
    directory, _ = hf_checkpoint("good")
    assert gj.load_pretrained(directory, load_tokenizer=False).config.num_layers == 2
