"""DSI examples as the reference builds them: ratio arithmetic, truncation, labels, removal, caching."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import genir_jax as gj
from genir_jax.data import dsi
from genir_jax.data.corpus import Document, Query
from genir_jax.data.dsi import (INDEX_TEXT_MAX_CHARS, DSIExample, apply_ratio, build_dsi_examples,
                                parse_doc_id_list, tokenize_examples, tokenize_queries)
from genir_jax.base.errors import DataError, GenIRError


def _corpus(n_docs: int, n_queries: int, docs_per_query: int = 1):
    documents = [Document(str(i), f"document number {i}") for i in range(n_docs)]
    queries = [Query(f"q{j}", f"query {j}", tuple(str((j + k) % n_docs) for k in range(docs_per_query)))
               for j in range(n_queries)]
    return documents, queries


# --------------------------------------------------------------------------------------------------
# Ratio arithmetic
# --------------------------------------------------------------------------------------------------

def _expected_counts(docs: int, pairs: int, ratio: int) -> tuple[int, int, bool]:
    """The reference's repetition in exact arithmetic: (indexing, retrieval, whether a .5 tie decided it)."""
    def repeated(size, target):
        excess = Fraction(target) / size - 1
        copies = max(0, math.ceil(excess) - 1)          # `while x > 1: x -= 1` runs this often
        rest = (excess - copies) * size
        return size * (1 + copies) + round(rest), rest.denominator == 2
    if docs < pairs * ratio:
        count, tie = repeated(docs, pairs * ratio)
        return count, pairs, tie
    if docs > pairs * ratio:
        count, tie = repeated(pairs, Fraction(docs, ratio))
        return docs, count, tie
    return docs, pairs, False


def test_ratio_by_hand():
    index, retrieval = apply_ratio(list(range(10)), list("r" * 25), 1)      # x = 1.5: one copy + 5
    assert index == list(range(10)) * 2 + list(range(5)) and len(retrieval) == 25
    index, retrieval = apply_ratio(list(range(21)), ["a", "b", "c"], 2)      # 21 / 2 = 10.5 retrieval examples:
    assert retrieval == ["a", "b", "c"] * 3 + ["a", "b"] and len(index) == 21  # 9 + round(0.5 * 3) = 9 + 2
    index, retrieval = apply_ratio(list(range(5)), ["a"], 2)                 # 2.5: 2 + round(0.5) = 2 (half to even)
    assert retrieval == ["a", "a"]
    index, retrieval = apply_ratio(list(range(100)), list(range(50)), 32)   # the paper's ratio
    assert len(index) == 1600 and index[:100] == index[100:200] == list(range(100))
    assert apply_ratio(list(range(6)), list(range(3)), 2) == (list(range(6)), list(range(3)))
    assert apply_ratio(list(range(6)), list(range(9)), None) == (list(range(6)), list(range(9)))
    with pytest.raises(GenIRError, match="positive integer"):
        apply_ratio([1], [2], 0)
    with pytest.raises(DataError, match="needs indexing and retrieval examples"):
        apply_ratio([1, 2], [], 4)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.integers(1, 40))
def test_ratio_matches_the_formula(docs, pairs, ratio):
    index, retrieval = apply_ratio(list(range(docs)), list(range(pairs)), ratio)
    expected_index, expected_retrieval, tie = _expected_counts(docs, pairs, ratio)
    if tie:  # an exact .5 that the reference's float steps may round either way
        assert abs(len(index) - expected_index) <= 1 and abs(len(retrieval) - expected_retrieval) <= 1
    else:
        assert (len(index), len(retrieval)) == (expected_index, expected_retrieval)
    if docs < pairs * ratio:
        assert len(index) == pairs * ratio           # an integer target is met exactly
    for repeated, size in ((index, docs), (retrieval, pairs)):
        assert repeated == [i % size for i in range(len(repeated))]   # whole copies, then a prefix


# --------------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------------

def test_examples_in_reference_order_with_truncated_documents():
    long_text = "x" * 700 + " y" * 300
    documents = [Document("1", long_text), Document("2", "short")]
    queries = [Query("a", "first query", ("2", "1")), Query("b", "second query", ("1",))]
    examples = build_dsi_examples(documents, queries)
    assert examples == [
        DSIExample(long_text[:INDEX_TEXT_MAX_CHARS], "1", "index"), DSIExample("short", "2", "index"),
        DSIExample("first query", "2", "retrieval"), DSIExample("first query", "1", "retrieval"),
        DSIExample("second query", "1", "retrieval"),
    ]
    assert len(examples[0].text) == 1000


def test_removal_happens_after_the_ratio():
    documents, queries = _corpus(7, 5, docs_per_query=2)
    full = build_dsi_examples(documents, queries, ratio=3)
    removed = build_dsi_examples(documents, queries, ratio=3, remove="@DOC_ID_1@, 4 ,")
    assert removed == [e for e in full if e.doc_id not in {"1", "4"}]
    assert len(full) == 30 + 10 and sum(e.kind == "index" for e in full) == 30   # 10 pairs * 3
    assert {e.doc_id for e in removed} == {"0", "2", "3", "5", "6"}
    assert build_dsi_examples(documents, queries, ratio=3, remove=["1", "4"]) == removed
    assert parse_doc_id_list(" @DOC_ID_1@,4, 4,,") == ("1", "4")
    with pytest.raises(DataError, match=r"remove: documents \['99'\] are not in the corpus"):
        build_dsi_examples(documents, queries, remove="99")
    with pytest.raises(DataError, match="training query 'x': relevant document 'zz' is not in the corpus"):
        build_dsi_examples(documents, [Query("x", "t", ("zz",))])


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def docid_tokenizer(t5_tokenizer):
    tokenizer = copy.deepcopy(t5_tokenizer)
    tokenizer.add_tokens([gj.docid_token(i) for i in range(7)])
    return tokenizer


def test_tokenization_matches_the_reference_calls(docid_tokenizer):
    documents, queries = _corpus(7, 5, docs_per_query=2)
    documents[3] = Document("3", "word " * 400)  # longer than max_length tokens
    examples = build_dsi_examples(documents, queries, ratio=2)
    tokenized = tokenize_examples(examples, docid_tokenizer, max_length=16)
    assert tokenized.input_ids.dtype == tokenized.attention_mask.dtype == tokenized.labels.dtype == np.int32
    assert tokenized.input_ids.shape == (len(examples), 16) and len(tokenized) == len(examples)
    # What preprocess.py does: inputs truncated to max_length (</s> kept), atomic labels without EOS.
    reference = docid_tokenizer([e.text for e in examples], max_length=16, truncation=True)
    labels = docid_tokenizer("", text_target=[gj.docid_token(e.doc_id) for e in examples],
                             add_special_tokens=False)["labels"]
    for row, (ids, mask) in enumerate(zip(reference["input_ids"], reference["attention_mask"])):
        assert tokenized.input_ids[row].tolist() == ids + [0] * (16 - len(ids))
        assert tokenized.attention_mask[row].tolist() == mask + [0] * (16 - len(mask))
    assert all(len(label) == 1 for label in labels)                   # one decoder step
    assert tokenized.labels.tolist() == [label[0] for label in labels]
    long_row = [e.doc_id == "3" and e.kind == "index" for e in examples].index(True)
    assert tokenized.input_ids[long_row, -1] == 1 and tokenized.attention_mask[long_row].all()

    short = tokenize_examples(examples[-3:], docid_tokenizer, max_length=64)   # all fit: narrower than 64
    assert short.input_ids.shape[1] == max(len(docid_tokenizer(e.text).input_ids) for e in examples[-3:]) < 64


def test_labels_need_the_docid_tokens(t5_tokenizer):
    with pytest.raises(GenIRError, match=r"@DOC_ID_0@.*not in the tokenizer's vocabulary"):
        tokenize_examples([DSIExample("text", "0", "index")], t5_tokenizer, max_length=8)


def test_cache_hits_and_misses(docid_tokenizer, tmp_path, monkeypatch):
    documents, queries = _corpus(7, 4)
    examples = build_dsi_examples(documents, queries, ratio=4)
    first = tokenize_examples(examples, docid_tokenizer, 12, cache_dir=tmp_path)
    files = list(tmp_path.glob("dsi-examples-*.npz"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    with monkeypatch.context() as patch:
        patch.setattr(dsi, "_tokenize_unique", fail)
        cached = tokenize_examples(examples, docid_tokenizer, 12, cache_dir=tmp_path)
    for name in ("input_ids", "attention_mask", "labels"):
        np.testing.assert_array_equal(getattr(cached, name), getattr(first, name))
    tokenize_examples(examples, docid_tokenizer, 13, cache_dir=tmp_path)                 # other max_length
    tokenize_examples(examples[:-1], docid_tokenizer, 12, cache_dir=tmp_path)            # other examples
    other = copy.deepcopy(docid_tokenizer)
    other.add_tokens(["@DOC_ID_extra@"])
    tokenize_examples(examples, other, 12, cache_dir=tmp_path)                           # other vocabulary
    assert len(list(tmp_path.glob("dsi-examples-*.npz"))) == 4
    assert not list(tmp_path.glob(".*"))                                                 # no temp files left


def test_tokenize_queries(t5_tokenizer):
    queries = [Query("a", "Which NFL team represented the AFC at Super Bowl 50?", ("1",)), Query("b", "hi", ("1",))]
    ids, mask = tokenize_queries(queries, t5_tokenizer, max_length=32)
    # SOURCE.md of t5-tokenizer: the ids of this question, plus </s>.
    assert ids[0].tolist() == [4073, 10439, 372, 7283, 8, 71, 5390, 44, 2011, 9713, 943, 58, 1]
    assert ids.shape == mask.shape == (2, 13) and mask[1].tolist() == [1, 1] + [0] * 11
    ids, mask = tokenize_queries(queries, t5_tokenizer, max_length=32, pad_to_max_length=True)
    assert ids.shape == (2, 32) and int(mask.sum()) == 13 + len(t5_tokenizer("hi").input_ids)
    ids, _ = tokenize_queries(["a b c d e f g h"], t5_tokenizer, max_length=4)
    assert ids.shape == (1, 4) and ids[0, -1] == 1
    with pytest.raises(GenIRError, match="max_length"):
        tokenize_queries(queries, t5_tokenizer, max_length=1)
