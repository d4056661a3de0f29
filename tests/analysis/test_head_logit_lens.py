"""The per-head logit lens against numpy: head writes from hook_z and W_O, the final norm and the unembedding
written out by hand, ranks by a stable argsort."""

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.analysis.head_logit_lens import HeadLogitLensResult, run_head_logit_lens, write_head_logit_lens
from genir_jax.base.errors import GenIRError
from tests.hf_fixtures import padded_batch

CONFIG = gj.t5_v1_0(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
                    dropout_rate=0.0)
V11 = gj.t5_v1_1(vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=2, num_heads=2,
                 dropout_rate=0.0)


def _numpy_lens(config, params, ids, mask, targets, is_docid, top):
    start = np.full((len(ids), 1), config.decoder_start_token_id, np.int32)
    names = [f"decoder.{layer}.cross_attn.hook_z" for layer in range(config.num_decoder_layers)]
    _, cache = gj.forward_with_cache(config, params, ids, mask, start, cache_sites=names)
    out = np.asarray(params["decoder"]["layers"]["cross_attn"]["out"], np.float64)
    scale = np.asarray(params["decoder"]["final_norm"]["scale"], np.float64)
    if config.tie_word_embeddings:
        table = np.asarray(params["shared"], np.float64)
    else:
        table = np.asarray(params["lm_head"], np.float64).T
    ranks = np.zeros((len(ids), config.num_decoder_layers, config.num_heads), int)
    counts = np.zeros_like(ranks)
    for layer, name in enumerate(names):
        z = np.asarray(cache[name], np.float64)[:, 0]                       # [B, H, K]
        for head in range(config.num_heads):
            write = z[:, head] @ out[layer, head]                             # [B, D]
            normed = write / np.sqrt(np.mean(write ** 2, -1, keepdims=True) + config.layer_norm_epsilon) * scale
            if config.scale_decoder_outputs:
                normed = normed * config.d_model ** -0.5
            logits = normed @ table.T
            for row in range(len(ids)):
                order = np.argsort(-logits[row], kind="stable")
                ranks[row, layer, head] = int(np.nonzero(order == targets[row])[0][0])
                counts[row, layer, head] = int(is_docid[order[:top]].sum())
    return ranks, counts


@pytest.mark.parametrize("config", [CONFIG, V11], ids=["v1_0", "v1_1"])
def test_head_logit_lens_matches_numpy(config):
    params = gj.init_params(config, 3)
    ids, mask, _ = padded_batch(config.vocab_size, [5, 7, 3, 6, 4], seed=1)
    targets = np.array([100, 101, 102, 103, 104])
    is_docid = np.zeros(config.vocab_size, bool)
    is_docid[100:] = True
    result = run_head_logit_lens(config, params, ids, mask, targets, is_docid, top=10, batch_size=2)
    ranks, counts = _numpy_lens(config, params, ids, mask, targets, is_docid, 10)
    np.testing.assert_array_equal(result.target_rank, ranks)
    np.testing.assert_array_equal(result.docid_top, counts)
    assert result.target_rank.shape == (5, config.num_decoder_layers, config.num_heads)
    assert len(set(result.target_rank.reshape(-1).tolist())) > 3  # the ranks really vary across heads


def test_summary_and_files(tmp_path):
    ranks = np.array([[[0, 50]], [[20, 3]]])  # 2 queries, 1 layer, 2 heads
    result = HeadLogitLensResult(ranks, np.array([[[10, 0]], [[5, 5]]]), top=10)
    summary = result.summary()
    assert summary["queries"] == 2
    assert summary["heads"][0] == {"layer": 0, "head": 0, "median_target_rank": 10.0, "target_in_top": 0.5,
                                   "docid_share_in_top": 0.75}
    assert summary["heads"][1]["target_in_top"] == 0.5 and summary["heads"][1]["docid_share_in_top"] == 0.25
    write_head_logit_lens(tmp_path, result)
    np.testing.assert_array_equal(np.load(tmp_path / "head_logit_lens_ranks.npy"), ranks)
    assert (tmp_path / "head_logit_lens.json").is_file()


def test_bad_inputs_are_refused():
    params = gj.init_params(CONFIG, 0)
    ids, mask = np.ones((2, 3), np.int32), np.ones((2, 3), np.int32)
    with pytest.raises(GenIRError, match="docid mask"):
        run_head_logit_lens(CONFIG, params, ids, mask, [1, 2], np.zeros(5, bool))
    with pytest.raises(GenIRError, match="top must be"):
        run_head_logit_lens(CONFIG, params, ids, mask, [1, 2], np.zeros(CONFIG.vocab_size, bool), top=0)
