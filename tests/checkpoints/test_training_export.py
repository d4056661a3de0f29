"""The exported DSI and base models load in transformers with the same logits, tokenizer and docid tokens."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from genir_jax.data.prepare import load_prepared
from genir_jax.checkpoints.hf import PretrainedModel, load_pretrained
from genir_jax.core.model import forward, init_params
from genir_jax.training.dsi import finetune
from genir_jax.training.presets import TINY, T5_VOCAB_SIZE
from genir_jax.training.pretrain import pretrain
from tests.training.test_training_cli import make_prepared


def _torch_first_step_logits(directory, input_ids, attention_mask):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids, dtype=torch.long),
                    attention_mask=torch.tensor(attention_mask, dtype=torch.long),
                    decoder_input_ids=torch.zeros((len(input_ids), 1), dtype=torch.long))
    return out.logits.numpy()


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_dsi_export_loads_in_transformers(tmp_path, t5_tokenizer):
    from transformers import AutoTokenizer

    prepared = make_prepared(tmp_path / "prepared")
    documents, splits = load_prepared(prepared)
    config = TINY.model.config(T5_VOCAB_SIZE)
    base = PretrainedModel(config, init_params(config, 0), t5_tokenizer)
    settings = TINY.dsi
    run = dataclasses.replace(settings.run, steps=6, eval_every=3, checkpoint_every=3)
    out = tmp_path / "dsi"
    summary = finetune(base, documents, splits, settings, run, str(out), progress=False)
    assert summary["best"]["step"] in (3, 6)

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) == 32100 + 16
    ids = tokenizer.convert_tokens_to_ids([f"@DOC_ID_d{i}@" for i in range(16)])
    assert ids == list(range(32100, 32116))
    assert tokenizer.tokenize("what is @DOC_ID_d3@")[-1] == "@DOC_ID_d3@"

    ours = load_pretrained(out)
    encoded = tokenizer(["what is the comet", "history of the falcon and more"], padding=True, return_tensors="np")
    input_ids = encoded["input_ids"].astype(np.int32)
    attention_mask = encoded["attention_mask"].astype(np.int32)
    expected = _torch_first_step_logits(out, input_ids, attention_mask)
    logits = np.asarray(forward(ours.config, ours.params, input_ids, attention_mask, np.zeros((2, 1), np.int32)))
    assert logits.shape == expected.shape == (2, 1, 32116)
    np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=2e-4)
    # The export is the best validation checkpoint, and ranking from it reproduces the recorded Hits@1.
    from genir_jax.training.dsi import retrieval_evaluator

    val = retrieval_evaluator(ours.config, ours.tokenizer, splits["val"], [d.id for d in documents],
                              settings.query_max_length)(ours.params)
    assert val["Hits@1"] == pytest.approx(summary["best"]["Hits@1"])


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_pretrain_export_loads_in_transformers(tmp_path, t5_tokenizer):
    from transformers import AutoTokenizer

    prepared = make_prepared(tmp_path / "prepared")
    documents, splits = load_prepared(prepared)
    texts = [d.text for d in documents] + [q.text for q in splits["train"]]
    settings = dataclasses.replace(TINY.pretrain, val_chunks=8)
    run = dataclasses.replace(settings.run, steps=4, eval_every=2, checkpoint_every=2, batch_size=4)
    out = tmp_path / "base"
    summary = pretrain(texts, t5_tokenizer, TINY.model, settings, run, str(out), progress=False)
    assert summary["data"]["val_chunks"] > 0 and summary["best"]["val_loss"] > 0

    model = load_pretrained(out)
    assert model.config.vocab_size == T5_VOCAB_SIZE and len(model.tokenizer) == 32100
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    encoded = tokenizer(["The comet <extra_id_0> history."], return_tensors="np")
    input_ids = encoded["input_ids"].astype(np.int32)
    attention_mask = encoded["attention_mask"].astype(np.int32)
    expected = _torch_first_step_logits(out, input_ids, attention_mask)
    logits = np.asarray(forward(model.config, model.params, input_ids, attention_mask, np.zeros((1, 1), np.int32)))
    np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=2e-4)
    leaves = jax.tree_util.tree_leaves(model.params)
    assert all(leaf.dtype == np.float32 for leaf in leaves)
