"""The one check that a base / source model's vocabulary covers the GenIR model's tokens."""

import numpy as np
import pytest

from genir_jax.analysis.inputs import check_vocabulary_covers
from genir_jax.base.errors import GenIRError
from genir_jax.core.config import t5_v1_1

CONFIG = t5_v1_1(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2)


def test_vocabulary_cover_check_and_its_message():
    check_vocabulary_covers("t5", CONFIG, np.array([[0, 99]]), np.array([5]))  # every id below 100: covered
    with pytest.raises(GenIRError) as error:
        check_vocabulary_covers("base/", CONFIG, np.array([[3, 4]]), np.array([100]), tokens="query and docid")
    assert str(error.value) == ("base/: the T5's vocabulary (100) does not cover the query and docid tokens; it must "
                                "share the GenIR model's word vocabulary")
    with pytest.raises(GenIRError, match="^src: the source model's vocabulary \\(100\\) does not cover the query "):
        check_vocabulary_covers("src", CONFIG, np.array([[100]]), model="the source model")
