"""Ranking, metrics and run files checked against numbers computed another way."""

from __future__ import annotations

import math

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.data.corpus import Document, Query
from genir_jax.base.errors import DataError
from genir_jax.docids.retrieval import (METRICS, NON_DOCID, correct_valid, evaluate_run, per_query_metrics, rank_docids,
                                 read_trec_run, run_from_ranking, write_trec_run)
from tests.dsi_fixtures import tiny_dsi_model

# --------------------------------------------------------------------------------------------------
# Metrics on a small run file, by hand
# --------------------------------------------------------------------------------------------------

RUN_FILE = """\
q1 Q0 x 1 9.0 sys
q1 Q0 d1 2 8.0 sys
q1 Q0 y 3 7.0 sys
q2 Q0 d3 1 5.0 sys
q2 Q0 a 2 4.0 sys
q2 Q0 b 3 3.0 sys
q2 Q0 c 4 2.5 sys
q2 Q0 d 5 2.0 sys
q2 Q0 e 6 1.5 sys
q2 Q0 d2 7 1.0 sys
q4 Q0 d9 1 2.0 sys
q4 Q0 d5 2 2.0 sys
q5 Q0 d1 1 1.0 sys
"""
QRELS = {
    "q1": {"d1": 4},
    "q2": {"d2": 4, "d3": 3},
    "q3": {"d4": 4},                                        # no result in the run: scores 0
    "q4": {"d5": 4, "d6": 3, "d7": 2, "d8": 1, "d9": 0},     # d9 has grade 0: not relevant (trec_eval)
}


def _dcg(gains):
    return sum(g / math.log2(rank + 2) for rank, g in enumerate(gains))


def test_metrics_equal_hand_computed_ones(tmp_path):
    path = tmp_path / "small.run"
    path.write_text(RUN_FILE)
    run = read_trec_run(path)
    assert [d for d, _ in run["q4"]] == ["d9", "d5"]  # a score tie keeps the rank column's order
    expected = {
        "q1": {"Hits@1": 0, "Hits@10": 1, "Recall@5": 1, "MRR@10": 1 / 2, "nDCG@10": _dcg([0, 4]) / _dcg([4])},
        "q2": {"Hits@1": 1, "Hits@10": 1, "Recall@5": 1 / 2, "MRR@10": 1,
               "nDCG@10": _dcg([3, 0, 0, 0, 0, 0, 4]) / _dcg([4, 3])},
        "q3": {name: 0 for name in METRICS},
        "q4": {"Hits@1": 0, "Hits@10": 1, "Recall@5": 1 / 4, "MRR@10": 1 / 2,
               "nDCG@10": _dcg([0, 4]) / _dcg([4, 3, 2, 1])},
    }
    assert expected["q2"]["nDCG@10"] == pytest.approx((3 + 4 / 3) / (4 + 3 / math.log2(3)))
    per_query = per_query_metrics(run, QRELS)
    assert set(per_query) == set(QRELS)                     # q5 is not judged: ignored
    for query_id, values in expected.items():
        for name, value in values.items():
            assert per_query[query_id][name] == pytest.approx(value, abs=1e-4), (query_id, name)
    metrics = evaluate_run(run, QRELS)
    assert metrics["queries"] == 4
    for name in METRICS:
        assert metrics[name] == pytest.approx(sum(v[name] for v in expected.values()) / 4, abs=1e-4)
    assert correct_valid(run, QRELS) == [["@DOC_ID_d3@", "q2"], ["@DOC_ID_d9@", "q4"]]  # listed = correct


def test_our_rank_order_decides_ties():
    """trec_eval would break the score tie by docid (z before a); we evaluate the order we ranked in."""
    run = {"q": [("a", 1.0), ("z", 1.0)]}
    assert evaluate_run(run, {"q": {"a": 1}})["Hits@1"] == 1.0
    assert evaluate_run(run, {"q": {"z": 1}})["Hits@1"] == 0.0
    with pytest.raises(DataError, match="lists document 'a' twice"):
        evaluate_run({"q": [("a", 2.0), ("a", 1.0)]}, {"q": {"a": 1}})


def test_run_files_round_trip_and_errors(tmp_path):
    run = {"q1": [("d2", 3.5), ("d1", -1.25)], "q2": [("d1", 0.5)]}
    write_trec_run(tmp_path / "r.trec", run, "my system")
    assert (tmp_path / "r.trec").read_text().splitlines()[0] == "q1 Q0 d2 1 3.5 my_system"
    assert read_trec_run(tmp_path / "r.trec") == run
    for content, message in [("q1 Q0 d1 1 x s\n", r"line 1: rank '1' and score 'x' must be numbers"),
                             ("q1 Q0 d1 1 1.0\n", r"line 1: expected 6 fields"),
                             ("q1 Q0 d1 1 1 s\nq1 Q0 d1 2 0 s\n", r"line 2: document 'd1' repeats for query 'q1'"),
                             ("q1 Q0 d1 1 nan s\n", r"line 1: score 'nan' is not finite")]:
        (tmp_path / "bad.trec").write_text(content)
        with pytest.raises(DataError, match=r"bad\.trec: " + message):
            read_trec_run(tmp_path / "bad.trec")


# --------------------------------------------------------------------------------------------------
# Ranking with a model: brute force over gj.forward logits
# --------------------------------------------------------------------------------------------------

def test_rank_docids_matches_brute_force(hf_checkpoint, t5_tokenizer):
    doc_ids = [f"d{i}" for i in range(40)]
    model, token_ids = tiny_dsi_model(hf_checkpoint, t5_tokenizer, doc_ids)
    texts = ["who wrote the harry potter books", "capital of france", "a", "the quick brown fox jumps",
             "what similarity laws must be obeyed", "b c d", "nfl team afc super bowl"]
    encoded = model.tokenizer(texts, padding=True, return_tensors="np")
    ids, mask = encoded.input_ids, encoded.attention_mask
    start = np.zeros((len(texts), 1), dtype=np.int32)
    logits = np.asarray(gj.forward(model.config, model.params, ids, mask, start))[:, 0, :]

    docid_logits = logits[:, token_ids]
    expected = np.argsort(-docid_logits, axis=1, kind="stable")[:, :10]
    indices, scores = rank_docids(model.config, model.params, ids, mask, token_ids, k=10, batch_size=3,
                                  progress=False)                            # 3 chunks, the last one padded
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(docid_logits, expected, axis=1), rtol=1e-5, atol=1e-5)

    # The reference: top k of the full vocabulary, word tokens included (-1 here).
    order = np.argsort(-logits, axis=1, kind="stable")[:, :300]
    position = {int(t): i for i, t in enumerate(token_ids)}
    expected_full = np.vectorize(lambda t: position.get(int(t), -1))(order)
    full, full_scores = rank_docids(model.config, model.params, ids, mask, token_ids, k=300, batch_size=4,
                                    full_vocabulary=True, progress=False)
    np.testing.assert_array_equal(full, expected_full)
    np.testing.assert_allclose(full_scores, np.take_along_axis(logits, order, axis=1), rtol=1e-5, atol=1e-5)
    assert (full == -1).any() and (full >= 0).any()   # both kinds of token compete, as in the reference

    run = run_from_ranking([f"q{i}" for i in range(len(texts))], doc_ids, full, full_scores)
    first_row = run["q0"]
    assert [d for d, _ in first_row] == [doc_ids[i] if i >= 0 else f"{NON_DOCID}{r}" for r, i in enumerate(full[0])]


def test_rank_docids_checks_its_inputs(hf_checkpoint, t5_tokenizer):
    model, token_ids = tiny_dsi_model(hf_checkpoint, t5_tokenizer, ["a", "b"])
    ids = np.array([[100, 1]], dtype=np.int32)
    mask = np.ones_like(ids)
    indices, scores = rank_docids(model.config, model.params, ids, mask, token_ids, k=100, progress=False)
    assert indices.shape == scores.shape == (1, 2)                         # k is capped by the docid count
    with pytest.raises(gj.CheckpointError, match=r"must lie in \[0, 32102\)"):
        rank_docids(model.config, model.params, ids, mask, [5, 40000])
    with pytest.raises(ValueError, match="must be equal"):
        rank_docids(model.config, model.params, ids, mask[:, :1], token_ids)


# --------------------------------------------------------------------------------------------------
# BM25 against the Lucene formula
# --------------------------------------------------------------------------------------------------

def test_bm25_scores_follow_the_lucene_formula():
    from genir_jax.docids.bm25 import bm25_run

    documents = [Document("1", "wing flow wing lift"), Document("2", "heat transfer in slabs"),
                 Document("3", "lift of a wing in a slipstream flow"), Document("4", "boundary layer heat")]
    queries = [Query("a", "wing lift", ("1",)), Query("b", "heat flow", ("2",)), Query("c", "zebra", ("3",))]
    tokens = {"1": ["wing", "flow", "wing", "lift"], "2": ["heat", "transfer", "slabs"],
              "3": ["lift", "wing", "slipstream", "flow"], "4": ["boundary", "layer", "heat"]}  # stop words out
    k1, b, n = 1.2, 0.75, 4
    average = sum(len(t) for t in tokens.values()) / n

    def score(query_terms, doc):
        total = 0.0
        for term in query_terms:
            df = sum(term in t for t in tokens.values())
            tf = tokens[doc].count(term)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            total += idf * tf / (tf + k1 * (1 - b + b * len(tokens[doc]) / average))
        return total

    run = bm25_run(documents, queries, k=10, k1=k1, b=b, progress=False)
    for query, terms in (("a", ["wing", "lift"]), ("b", ["heat", "flow"])):
        expected = sorted(((d, score(terms, d)) for d in tokens if score(terms, d) > 0), key=lambda x: -x[1])
        assert [d for d, _ in run[query]] == [d for d, _ in expected]
        np.testing.assert_allclose([s for _, s in run[query]], [s for _, s in expected], rtol=1e-5)
    assert run["c"] == []                                                    # no shared term: nothing retrieved
    metrics = evaluate_run(run, {"a": {"1": 4}, "b": {"2": 4}, "c": {"3": 4}})
    assert metrics["Hits@1"] == pytest.approx((1 + (run["b"][0][0] == "2")) / 3)


def test_bm25_refuses_a_corpus_without_indexable_terms():
    """Only stop words and one-letter words: bm25s would fail inside its scorer (max() of an empty sequence)."""
    from genir_jax.docids.bm25 import bm25_run

    documents = [Document("1", "the a of"), Document("2", "is it x, and y!")]
    with pytest.raises(DataError, match=r"^docs\.json: bm25: no document has an indexable term .* in 2 document"):
        bm25_run(documents, [Query("a", "wing", ("1",))], k=2, progress=False, source="docs.json")
