"""The read-only `T5FastTokenizer` (tokenizers only) against transformers' AutoTokenizer: same ids, tokens,
strings, vocabulary and special tokens, on every SQuAD dev question and on a checkpoint with docid tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.base.errors import GenIRError
from genir_jax.checkpoints.tokenizer import T5FastTokenizer, fast_tokenizer_supported, load_tokenizer

EDGE_CASES = ["", " ", "  leading spaces", "trailing spaces  ", "a  b\tc\nd", "café naïve élan", "日本語のテキスト",
              "don't you're I'm", "x <extra_id_0> y", "<pad></s><unk>", "A\u00a0B", "\ufb01 ligature \u00bd",
              "@DOC_ID_d1@", "see @DOC_ID_d2@ and @DOC_ID_d10@!", "what is   the\u2009answer ?"]
DOC_IDS = ["d1", "d2", "d10", "7", "doc-x"]


def _squad_questions(shared_data) -> list[str]:
    data = json.loads((shared_data / "squad-v1.1-dev" / "dev-v1.1.json").read_text(encoding="utf-8"))
    return [qa["question"] for article in data["data"] for paragraph in article["paragraphs"]
            for qa in paragraph["qas"]]


def _assert_same(fast, slow, texts):
    assert len(fast) == len(slow)
    assert fast.get_vocab() == slow.get_vocab()
    assert (fast.pad_token_id, fast.eos_token_id, fast.unk_token_id) == \
        (slow.pad_token_id, slow.eos_token_id, slow.unk_token_id)
    for text in texts:
        assert fast(text).input_ids == slow(text).input_ids, text
        assert fast(text).attention_mask == slow(text).attention_mask, text
        assert fast.tokenize(text) == slow.tokenize(text), text
    batch = texts[:64]
    ours, theirs = fast(batch, padding=True, return_tensors="np"), slow(batch, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ours.input_ids, theirs.input_ids)
    np.testing.assert_array_equal(ours.attention_mask, theirs.attention_mask)
    assert ours.input_ids.dtype == theirs.input_ids.dtype
    for max_length in (2, 5, 16):
        assert fast(batch, max_length=max_length, truncation=True)["input_ids"] == \
            slow(batch, max_length=max_length, truncation=True)["input_ids"]
        assert fast(batch, add_special_tokens=False, verbose=False)["input_ids"] == \
            slow(batch, add_special_tokens=False, verbose=False)["input_ids"]


def test_every_squad_question_tokenizes_as_transformers(shared_data):
    from transformers import AutoTokenizer

    directory = shared_data / "t5-tokenizer"
    fast, slow = load_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    assert isinstance(fast, T5FastTokenizer)
    questions = _squad_questions(shared_data)
    assert len(questions) > 10000
    _assert_same(fast, slow, questions + EDGE_CASES)
    ids = list(range(0, len(slow), 13)) + list(range(31990, len(slow)))
    assert fast.convert_ids_to_tokens(ids) == slow.convert_ids_to_tokens(ids)
    for token_id in ids:
        assert fast.decode([token_id]) == slow.decode([token_id])
    sample = fast(questions[:20]).input_ids
    assert [fast.decode(row) for row in sample] == [slow.decode(row) for row in sample]
    assert [fast.decode(row, skip_special_tokens=True) for row in sample] == \
        [slow.decode(row, skip_special_tokens=True) for row in sample]


@pytest.fixture(scope="module")
def docid_checkpoint(tmp_path_factory, t5_tokenizer):
    """A DSI-style checkpoint: the real T5 vocabulary plus docid tokens, saved by genir-jax."""
    from tests.hf_fixtures import HFCheckpointFactory

    root = tmp_path_factory.mktemp("fasttok")
    directory, _ = HFCheckpointFactory(root)("base", tokenizer=t5_tokenizer, vocab_size=32128, d_model=16, d_kv=4,
                                             d_ff=32, num_layers=1, num_heads=2)
    model = gj.add_docid_tokens(gj.load_pretrained(directory), DOC_IDS)
    gj.save_pretrained(root / "dsi", model)
    return root / "dsi"


def test_docid_checkpoint_tokenizes_as_transformers(docid_checkpoint, shared_data):
    from transformers import AutoTokenizer

    fast_model = gj.load_pretrained(docid_checkpoint, fast_tokenizer=True)
    slow_model = gj.load_pretrained(docid_checkpoint)
    fast, slow = fast_model.tokenizer, slow_model.tokenizer
    assert isinstance(fast, T5FastTokenizer) and not isinstance(slow, T5FastTokenizer)
    assert slow.get_vocab() == AutoTokenizer.from_pretrained(str(docid_checkpoint)).get_vocab()
    _assert_same(fast, slow, _squad_questions(shared_data)[:500] + EDGE_CASES)
    np.testing.assert_array_equal(gj.docid_token_ids(fast, DOC_IDS), gj.docid_token_ids(slow, DOC_IDS))
    docid_ids = [int(i) for i in gj.docid_token_ids(fast, DOC_IDS)]
    assert docid_ids == list(range(32100, 32100 + len(DOC_IDS)))
    assert fast.convert_ids_to_tokens(docid_ids) == slow.convert_ids_to_tokens(docid_ids) == \
        [gj.docid_token(d) for d in DOC_IDS]
    assert [fast.decode([t]) for t in docid_ids] == [slow.decode([t]) for t in docid_ids]
    assert fast.convert_tokens_to_ids("@DOC_ID_missing@") == slow.convert_tokens_to_ids("@DOC_ID_missing@")
    with pytest.raises(GenIRError, match="not in the tokenizer's vocabulary"):
        gj.docid_token_ids(fast, ["missing"])
    # the analyses' inputs are identical
    from genir_jax.analysis.inputs import tokenize_for_analysis

    texts = _squad_questions(shared_data)[:40]
    for reference_padding in (False, True):
        for ours, theirs in zip(tokenize_for_analysis(fast, texts, reference_padding=reference_padding),
                                tokenize_for_analysis(slow, texts, reference_padding=reference_padding)):
            np.testing.assert_array_equal(ours, theirs)


def test_fast_tokenizer_is_read_only_and_saves_by_copying(docid_checkpoint, tmp_path):
    from transformers import AutoTokenizer

    model = gj.load_pretrained(docid_checkpoint, fast_tokenizer=True)
    with pytest.raises(GenIRError, match="read-only"):
        gj.add_docid_tokens(model, ["new"])
    gj.save_pretrained(tmp_path / "copy", model)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "copy"))
    assert reloaded.get_vocab() == model.tokenizer.get_vocab()
    assert reloaded("who wrote it").input_ids == model.tokenizer("who wrote it").input_ids


def test_falls_back_to_transformers_where_not_equivalent(tmp_path, shared_data):
    source = shared_data / "t5-tokenizer"
    spiece_only = tmp_path / "spiece-only"
    spiece_only.mkdir()
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        (spiece_only / name).write_bytes((source / name).read_bytes())
    assert not fast_tokenizer_supported(spiece_only)
    assert not isinstance(load_tokenizer(spiece_only), T5FastTokenizer)
    other_class = tmp_path / "other-class"
    other_class.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (other_class / name).write_bytes((source / name).read_bytes())
    config = json.loads((source / "tokenizer_config.json").read_text())
    (other_class / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    assert not fast_tokenizer_supported(other_class)
    assert fast_tokenizer_supported(source)
    assert not isinstance(load_tokenizer(source, fast=False), T5FastTokenizer)
