"""Atomic docid tokens: the reference spelling, and embedding resizing as transformers does it."""

from __future__ import annotations

import json

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.docids.tokens import doc_id_of_token, docid_vocabulary
from tests.hf_fixtures import padded_batch, torch_logits

SMALL_REAL_VOCAB = dict(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)


def test_reference_spelling():
    assert gj.docid_token(7) == "@DOC_ID_7@"
    assert gj.docid_token(" 12 ") == "@DOC_ID_12@"
    assert gj.docid_token("doc-a") == "@DOC_ID_doc-a@"
    assert doc_id_of_token("@DOC_ID_12@") == "12"
    with pytest.raises(TypeError, match="str or int"):
        gj.docid_token(1.5)
    with pytest.raises(ValueError, match="empty"):
        gj.docid_token("  ")


def _hf_resized(torch_model, tokenizer, doc_ids):
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([gj.docid_token(d) for d in doc_ids])
    torch_model.resize_token_embeddings(len(tokenizer))
    return torch_model, tokenizer


@pytest.mark.parametrize("vocab_size, untied", [(32128, False), (32100, False), (32100, True)],
                         ids=["shrink_tied", "grow_tied", "grow_untied"])
def test_resize_matches_transformers(hf_checkpoint, t5_tokenizer, vocab_size, untied):
    settings = {**SMALL_REAL_VOCAB, "vocab_size": vocab_size}
    if untied:
        settings.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    directory, torch_model = hf_checkpoint("docids", tokenizer=t5_tokenizer, **settings)
    model = gj.load_pretrained(directory)
    doc_ids = list(range(10))
    ours = gj.add_docid_tokens(model, doc_ids)
    # transformers 5.x re-ties an untied lm_head to the embeddings at the end of resize_token_embeddings
    # (dropping the trained output layer); its own lm_head resizing, which 4.x kept, is taken before that.
    their_head = torch_model._get_resized_lm_head(torch_model.lm_head, 32110).weight.detach().numpy() \
        if untied else None
    theirs, their_tokenizer = _hf_resized(torch_model, t5_tokenizer, doc_ids)

    assert len(ours.tokenizer) == len(their_tokenizer) == 32110 and ours.config.vocab_size == 32110
    assert len(model.tokenizer) == 32100  # the input model is not modified
    assert ours.tokenizer.get_vocab() == their_tokenizer.get_vocab()
    their_shared = theirs.shared.weight.detach().numpy()
    our_shared = np.asarray(ours.params["shared"])
    assert our_shared.shape == their_shared.shape == (32110, 16)
    kept = min(vocab_size, 32110)
    np.testing.assert_array_equal(our_shared[:kept], their_shared[:kept])
    if vocab_size < 32110:  # added rows: N(mean, 1e-9 cov) in both, i.e. the old mean up to ~1e-4 * std
        old = np.asarray(model.params["shared"])
        mean, std = old.mean(0), old.std()
        for added in (our_shared[kept:], their_shared[kept:]):
            assert np.abs(added - mean).max() < 1e-3 * std
        assert len({row.tobytes() for row in our_shared[kept:]}) == 10  # rows differ, symmetry broken
    if untied:
        our_head = np.asarray(ours.params["lm_head"]).T
        np.testing.assert_array_equal(our_head[:kept], their_head[:kept])
        assert np.abs(our_head[kept:] - np.asarray(model.params["lm_head"]).T.mean(0)).max() < 1e-3


def test_resizing_is_deterministic_and_seeded(hf_checkpoint, t5_tokenizer):
    directory, _ = hf_checkpoint("seeded", tokenizer=t5_tokenizer, **{**SMALL_REAL_VOCAB, "vocab_size": 32100})
    model = gj.load_pretrained(directory)
    first = gj.add_docid_tokens(model, ["a", "b", "c"], seed=3)
    again = gj.add_docid_tokens(model, ["a", "b", "c"], seed=3)
    other = gj.add_docid_tokens(model, ["a", "b", "c"], seed=4)
    np.testing.assert_array_equal(first.params["shared"], again.params["shared"])
    assert not np.array_equal(first.params["shared"], other.params["shared"])


def test_docid_token_ids_are_single_tokens(hf_checkpoint, t5_tokenizer):
    directory, _ = hf_checkpoint("ids", tokenizer=t5_tokenizer, **SMALL_REAL_VOCAB)
    model = gj.add_docid_tokens(gj.load_pretrained(directory), [5, 17, "x9"])
    ids = gj.docid_token_ids(model.tokenizer, [17, 5, "x9"])
    np.testing.assert_array_equal(ids, [32101, 32100, 32102])
    assert model.tokenizer("@DOC_ID_17@", add_special_tokens=False).input_ids == [32101]
    assert docid_vocabulary(model.tokenizer) == {32100: "5", 32101: "17", 32102: "x9"}
    with pytest.raises(gj.GenIRError, match=r"'@DOC_ID_404@' \(document 404\) is not in the tokenizer"):
        gj.docid_token_ids(model.tokenizer, [404])
    with pytest.raises(gj.GenIRError, match="duplicate document ids"):
        gj.add_docid_tokens(model, [1, "1"])


def test_docid_model_exports_to_transformers(hf_checkpoint, t5_tokenizer, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    directory, _ = hf_checkpoint("export", tokenizer=t5_tokenizer, **SMALL_REAL_VOCAB)
    model = gj.add_docid_tokens(gj.load_pretrained(directory), range(40))
    assert model.config.vocab_size == 32140
    out = gj.save_pretrained(tmp_path / "dsi", model)
    torch_model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("@DOC_ID_39@") == 32139
    # what transformers 4.x (the reference's environment) needs to load the same tokenizer
    assert (tmp_path / "dsi" / "spiece.model").is_file()
    tokenizer_config = json.loads((tmp_path / "dsi" / "tokenizer_config.json").read_text())
    assert not isinstance(tokenizer_config.get("extra_special_tokens"), list)
    ids, mask, dec = padded_batch(32100, [9, 4])
    np.testing.assert_allclose(torch_logits(torch_model, ids, mask, dec),
                               np.asarray(gj.forward(model.config, model.params, ids, mask, dec)), atol=1e-4)
