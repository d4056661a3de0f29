"""A tiny random DSI model with the real T5 vocabulary plus docid tokens (test helper)."""

from __future__ import annotations

import numpy as np

import genir_jax as gj

TINY_REAL_VOCAB = dict(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)


def tiny_dsi_model(hf_checkpoint, tokenizer, doc_ids, *, docid_scale: float = 4.0, seed: int = 0):
    """A random T5 (real tokenizer) with ``@DOC_ID_<id>@`` tokens whose embedding rows are scaled up, so
    that docid and word tokens mix at the top of the vocabulary ranking (both ranking modes get tested)."""
    directory, _ = hf_checkpoint(f"base-{seed}", seed=seed, tokenizer=tokenizer, **TINY_REAL_VOCAB)
    model = gj.add_docid_tokens(gj.load_pretrained(directory), doc_ids, mean_resizing=False, seed=seed)
    token_ids = gj.docid_token_ids(model.tokenizer, doc_ids)
    shared = np.array(model.params["shared"])
    shared[token_ids] *= docid_scale
    return model.replace(params={**model.params, "shared": shared}), token_ids
