"""Tiny random DSI models with the real T5 vocabulary plus docid tokens (test helpers; the fixtures that
build them on disk are in tests/conftest.py and tests/cli/conftest.py)."""

from __future__ import annotations

import json

import numpy as np

import genir_jax as gj

TINY_REAL_VOCAB = dict(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)

# The checkpoint of the patching and sweep CLI tests (the `dsi` and `dsi_root` fixtures).
QUERIES = ["who wrote the harry potter books", "what is the capital of france", "when did the war end",
           "how many legs does a spider have", "where is the eiffel tower"]
DOC_IDS = ["d1", "d2", "d3", "d4", "d5"]
DIMS = dict(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2)

# The checkpoint of the logit-lens reading tests (`build_lens_dsi`, the `lens_dsi` fixture).
LENS_QUERIES = ["who wrote the harry potter books", "who won the world cup", "when did the war end",
                "how many legs does a spider have", "where is the eiffel tower", "when was the moon landing"]
LENS_DOC_IDS = [f"d{i}" for i in range(40)]
LENS_CORRECT = (3, 2, 4, 1, 5)  # order of correct_valid.json (token lengths 9, 6, 9, 6, 6)
LENS_DIMS = dict(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=4, num_heads=2)


def write_queries(root, queries, doc_ids, correct) -> None:
    """val.json (query i: id 100 + i, relevant document `doc_ids[i]`) and correct.json (the pairs of the
    queries at `correct`, in that order) in `root`."""
    val = [{"id": 100 + i, "query": q, "relevant_docs": [doc_ids[i]]} for i, q in enumerate(queries)]
    (root / "val.json").write_text(json.dumps(val))
    (root / "correct.json").write_text(json.dumps([[gj.docid_token(doc_ids[i]), 100 + i] for i in correct]))


def build_lens_dsi(root, tokenizer, docid_scale: float = 6.0):
    """A tiny random DSI checkpoint in root/dsi (real T5 tokenizer + docid tokens whose embedding rows are
    scaled up, so docids reach the top of logit-lens rankings), val queries with int ids and a
    correct_valid.json; returns the loaded model."""
    from tests.hf_fixtures import HFCheckpointFactory

    directory, _ = HFCheckpointFactory(root)("base", tokenizer=tokenizer, **LENS_DIMS)
    model = gj.add_docid_tokens(gj.load_pretrained(directory), LENS_DOC_IDS, mean_resizing=False)
    shared = np.array(model.params["shared"])
    shared[gj.docid_token_ids(model.tokenizer, LENS_DOC_IDS)] *= docid_scale
    model = model.replace(params={**model.params, "shared": shared})
    gj.save_pretrained(root / "dsi", model)
    write_queries(root, LENS_QUERIES, LENS_DOC_IDS, LENS_CORRECT)
    return gj.load_pretrained(root / "dsi")


def tiny_dsi_model(hf_checkpoint, tokenizer, doc_ids, *, docid_scale: float = 4.0, seed: int = 0):
    """A random T5 (real tokenizer) with ``@DOC_ID_<id>@`` tokens whose embedding rows are scaled up, so
    that docid and word tokens mix at the top of the vocabulary ranking (both ranking modes get tested)."""
    directory, _ = hf_checkpoint(f"base-{seed}", seed=seed, tokenizer=tokenizer, **TINY_REAL_VOCAB)
    model = gj.add_docid_tokens(gj.load_pretrained(directory), doc_ids, mean_resizing=False, seed=seed)
    token_ids = gj.docid_token_ids(model.tokenizer, doc_ids)
    shared = np.array(model.params["shared"])
    shared[token_ids] *= docid_scale
    return model.replace(params={**model.params, "shared": shared}), token_ids


def answering_model(model, texts, doc_ids):
    """`model` (atomic docids) made to answer: query `texts[i]` ranks the docid token of `doc_ids[i]` first over
    the whole vocabulary (masked queries, as `genir-jax evaluate` ranks), so hand-written correct_valid.json
    pairs can be truly correct. Only those docid tokens' unembedding rows change (no query holds a docid
    token): solved by least squares from the queries' first-step decoder outputs (themselves recovered from the
    logits) so that each query gives its docid a logit far above every word logit and the other docids 0
    (exact for at most d_model queries). Asserts the result."""
    from genir_jax.analysis.inputs import tokenize_for_analysis
    from genir_jax.core.model import unembedding_rows

    config, tokenizer = model.config, model.tokenizer
    ids, mask = tokenize_for_analysis(tokenizer, list(texts))
    start = np.zeros((len(texts), 1), np.int32)
    logits = np.asarray(gj.forward(config, model.params, ids, mask, start), np.float64)[:, 0]
    table, _ = unembedding_rows(config, model.params)
    outputs = np.linalg.lstsq(np.asarray(table, np.float64), logits.T, rcond=None)[0].T  # scale * decoder output
    tokens = gj.docid_token_ids(tokenizer, list(doc_ids))
    answers = sorted(set(tokens.tolist()))
    wanted = 100.0 * np.abs(logits).max() * (tokens[:, None] == np.asarray(answers)[None, :])  # [queries, docids]
    rows = np.array(table, np.float32)
    rows[answers] = np.linalg.lstsq(outputs, wanted, rcond=None)[0].T
    params = dict(model.params)
    if config.tie_word_embeddings:
        params["shared"] = rows
    else:
        params["lm_head"] = rows.T
    answering = model.replace(params=params)
    top = np.asarray(gj.forward(config, answering.params, ids, mask, start))[:, 0].argmax(-1)
    assert top.tolist() == tokens.tolist(), "the docid rows did not make the model answer every query"
    return answering
