"""DSI with decoder-only models (atomic docids): the examples (text + prompt + docid, loss on the docid only),
padding that changes nothing, docid rows added to the vocabulary, and ranking equal to transformers' logits."""

from __future__ import annotations

import numpy as np
import pytest

from genir_jax.checkpoints.decoder_hf import load_decoder_only, save_decoder_only
from genir_jax.data.corpus import Document, Query, write_queries
from genir_jax.data.dsi import DSIExample
from genir_jax.docids.retrieval import rank_docids, read_trec_run
from genir_jax.docids.tokens import docid_token_ids
from genir_jax.training.decoder_dsi import PROMPT, encode_examples, encode_prompts, start_tokens
from genir_jax.training.dsi import with_docids
from genir_jax.training.evaluation import evaluate_checkpoint
from genir_jax.training.loop import training_loss
from tests.decoder_fixtures import save_decoder_base, torch_causal_logits, train_tokenizer
from tests.training.test_training_cli import WORDS

DOCS = [Document(f"d{i}", f"The {w} is the subject of paragraph {i}, with {w} facts.") for i, w in enumerate(WORDS[:6])]
EXAMPLES = [DSIExample(doc.text, doc.id, "index") for doc in DOCS] + [
    DSIExample(f"what is the {w}", f"d{i}", "retrieval") for i, w in enumerate(WORDS[:6])]


def _model(tmp_path, kind: str = "gpt2", bos: bool = False):
    tokenizer = train_tokenizer([e.text for e in EXAMPLES], bos=bos)
    base = load_decoder_only(save_decoder_base(tmp_path / f"base-{kind}", kind, tokenizer))
    return with_docids(base, DOCS, seed=0, docid_init="random")


@pytest.mark.parametrize("kind,bos", [("gpt2", False), ("llama", True)])
def test_loss_mask_covers_exactly_the_docid_tokens(tmp_path, kind, bos):
    model = _model(tmp_path, kind, bos)
    tokenizer = model.tokenizer
    batch = encode_examples(EXAMPLES, tokenizer, 8)
    docids = docid_token_ids(tokenizer, [e.doc_id for e in EXAMPLES])
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    start = start_tokens(tokenizer)
    assert start == ([tokenizer.bos_token_id] if bos else [])
    assert (batch["target_mask"].sum(axis=1) == 1).all()  # one scored position per example
    np.testing.assert_array_equal(batch["targets"][batch["target_mask"] == 1], docids)  # exactly the docids
    is_docid = np.isin(batch["input_ids"], docids) & (batch["attention_mask"] == 1)
    np.testing.assert_array_equal(np.roll(batch["target_mask"], 1, axis=1), is_docid)  # mask sits just before them
    for row, example in enumerate(EXAMPLES):
        length = int(batch["attention_mask"][row].sum())
        text = tokenizer(example.text, add_special_tokens=False)["input_ids"][:8]
        assert batch["input_ids"][row, :length].tolist() == start + text + prompt + [int(docids[row])]
        assert batch["attention_mask"][row, length:].sum() == 0  # right padding
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])  # next tokens


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_padded_and_unpadded_batches_give_the_same_loss(tmp_path, kind):
    model = _model(tmp_path, kind, bos=kind == "llama")
    padded = encode_examples(EXAMPLES, model.tokenizer, 32, width=64)
    loss, metrics = training_loss(model.config, model.params, padded)
    assert metrics["tokens"] == len(EXAMPLES)
    single = []
    for example in EXAMPLES:  # each example alone, at its own length: no padding at all
        alone = encode_examples([example], model.tokenizer, 32)
        width = int(alone["attention_mask"].sum())
        alone = encode_examples([example], model.tokenizer, 32, width=width)
        assert alone["attention_mask"].all()
        single.append(float(training_loss(model.config, model.params, alone)[0]))
    np.testing.assert_allclose(float(loss), np.mean(single), rtol=1e-5)
    wider, _ = training_loss(model.config, model.params, encode_examples(EXAMPLES, model.tokenizer, 32, width=80))
    np.testing.assert_allclose(float(wider), float(loss), rtol=1e-6)


def test_docid_rows_are_added_to_embedding_and_head(tmp_path):
    tokenizer = train_tokenizer([e.text for e in EXAMPLES])
    base = load_decoder_only(save_decoder_base(tmp_path / "base", "llama", tokenizer))  # untied lm_head
    model = with_docids(base, DOCS, seed=0, docid_init="random")
    grown = base.config.vocab_size + len(DOCS)
    assert model.config.vocab_size == grown == len(model.tokenizer)
    assert model.params["embed"].shape[0] == grown and model.params["lm_head"].shape[1] == grown
    np.testing.assert_array_equal(model.params["embed"][:base.config.vocab_size], base.params["embed"])
    new = np.asarray(model.params["embed"][base.config.vocab_size:])
    assert 0.005 < new.std() < 0.05  # drawn like fresh rows (std 0.02), not copies of the mean
    assert docid_token_ids(model.tokenizer, [d.id for d in DOCS]).tolist() == list(range(base.config.vocab_size,
                                                                                          grown))


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_ranking_scores_equal_transformers_logits_after_the_prompt(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    model = _model(tmp_path, kind, bos=kind == "llama")
    saved = save_decoder_only(tmp_path / "dsi", model)
    reloaded = load_decoder_only(saved)
    queries = [Query(f"q{i}", text, (f"d{i}",)) for i, text in
               enumerate(["what is the apple", "river", "facts about the mountain and its long history"])]
    input_ids, attention_mask = encode_prompts(queries, reloaded.tokenizer, 32)
    assert len(set(attention_mask.sum(axis=1).tolist())) == 3  # rows of different lengths: padding in play
    token_ids = docid_token_ids(reloaded.tokenizer, [d.id for d in DOCS])
    indices, scores = rank_docids(reloaded.config, reloaded.params, input_ids, attention_mask, token_ids,
                                  k=len(DOCS), progress=False)
    torch_model = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager").eval()
    torch_scores = {}
    for row in range(len(queries)):
        length = int(attention_mask[row].sum())
        ids = input_ids[row:row + 1, :length]  # the prompt alone, unpadded
        expected = torch_causal_logits(torch_model, ids, np.ones_like(ids))[0, -1, token_ids]
        np.testing.assert_allclose(scores[row], expected[indices[row]], atol=1e-4)
        assert indices[row, 0] == int(np.argmax(expected))
        torch_scores[queries[row].id] = dict(zip([d.id for d in DOCS], expected.tolist()))
    # the evaluate step writes the same scores into its run (6 significant digits)
    write_queries(tmp_path / "queries.json", queries)
    result = evaluate_checkpoint(saved, tmp_path / "eval", queries=tmp_path / "queries.json", max_length=32,
                                 model_type="decoder")
    run = read_trec_run(tmp_path / "eval" / "run.trec")
    assert result.metrics["queries"] == 3 and (tmp_path / "eval" / "correct_valid.json").is_file()
    for query_id, ranked in run.items():
        assert [doc for doc, _ in ranked] == sorted(torch_scores[query_id], key=lambda d: -torch_scores[query_id][d])
        np.testing.assert_allclose([score for _, score in ranked], [torch_scores[query_id][d] for d, _ in ranked],
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.slow  # about a minute on 2 cores: two short training runs
def test_resumed_decoder_training_equals_an_uninterrupted_run(tmp_path):
    import shutil

    from safetensors.numpy import load_file

    from genir_jax.data.prepare import load_prepared
    from genir_jax.training.dsi import train_dsi
    from genir_jax.training.options import RunOverrides
    from tests.training.test_training_cli import make_prepared

    prepared = make_prepared(tmp_path / "prepared", documents=6)
    documents, splits = load_prepared(prepared)
    tokenizer = train_tokenizer([d.text for d in documents] + [q.text for q in splits["train"]])
    base = save_decoder_base(tmp_path / "base", "gpt2", tokenizer)
    overrides = RunOverrides(steps=12, batch_size=4, eval_every=6, checkpoint_every=6)
    runs = {}
    for name in ("whole", "resumed"):
        runs[name] = train_dsi(prepared, base, tmp_path / name, preset="tiny", overrides=overrides,
                               progress=False, model_type="decoder")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "12")  # as if killed between steps 6 and 12
    (tmp_path / "resumed" / "model.safetensors").unlink()
    resumed = train_dsi(prepared, base, tmp_path / "resumed", preset="tiny", overrides=overrides, progress=False,
                        model_type="decoder", resume="required")
    assert resumed["resumed_from"] == 6 and resumed["best"] == runs["whole"]["best"]
    whole, again = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "resumed"))
    assert whole.keys() == again.keys()
    for key in whole:
        np.testing.assert_array_equal(again[key], whole[key])


@pytest.mark.parametrize("kind,bos,scheme_name", [("gpt2", False, "naive"), ("llama", True, "semantic")])
def test_sequence_docid_examples_and_their_loss_equal_transformers(tmp_path, kind, bos, scheme_name):
    """Naive / semantic docids: text + prompt + the docid's tokens (no special tokens) + EOS, the loss on exactly
    those tokens, equal to transformers' causal-LM loss with labels -100 everywhere else."""
    import torch
    from transformers import AutoModelForCausalLM

    from genir_jax.docids.schemes import docid_token_sequences, naive_scheme, semantic_scheme

    doc_ids = [d.id for d in DOCS]
    scheme = (naive_scheme(doc_ids) if scheme_name == "naive"
              else semantic_scheme({d: f"{i % 2}_{i // 2}" for i, d in enumerate(doc_ids)}, doc_ids, "test"))
    tokenizer = train_tokenizer([e.text for e in EXAMPLES] + [scheme.words(d) for d in doc_ids], bos=bos)
    directory = save_decoder_base(tmp_path / "base", kind, tokenizer)
    model = load_decoder_only(directory)
    sequences = dict(zip(doc_ids, docid_token_sequences(scheme, tokenizer, doc_ids, "test", decoder_only=True)))
    batch = encode_examples(EXAMPLES, tokenizer, 8, docid_sequences=sequences)
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    torch_model = AutoModelForCausalLM.from_pretrained(directory).eval()
    torch_losses, counts = [], []
    for row, example in enumerate(EXAMPLES):
        docid = tokenizer(scheme.words(example.doc_id), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert sequences[example.doc_id] == docid and tokenizer.bos_token_id not in docid
        text = tokenizer(example.text, add_special_tokens=False)["input_ids"][:8]
        row_tokens = start_tokens(tokenizer) + text + prompt + docid
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == row_tokens
        assert np.flatnonzero(batch["target_mask"][row]).tolist() == list(range(length - len(docid) - 1, length - 1))
        assert batch["targets"][row][batch["target_mask"][row] == 1].tolist() == docid
        labels = [-100] * (length - len(docid)) + docid
        with torch.no_grad():
            out = torch_model(input_ids=torch.tensor([row_tokens]), labels=torch.tensor([labels]))
        torch_losses.append(float(out.loss) * len(docid))
        counts.append(len(docid))
    loss, metrics = training_loss(model.config, model.params, batch)
    assert metrics["tokens"] == sum(counts)
    np.testing.assert_allclose(float(loss), sum(torch_losses) / sum(counts), rtol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_loss_at_only_the_scored_positions_equals_the_full_loss(tmp_path, kind):
    """`causal_lm_loss(scored_per_row=K)` computes the head at K positions per row: the same loss, accuracy,
    token count and gradients as the head at every position."""
    import jax

    from genir_jax.training.loop import causal_lm_loss

    model = _model(tmp_path, kind)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, size=(3, 9)).astype(np.int32)
    mask = np.array([[1] * 9, [1] * 6 + [0] * 3, [1] * 4 + [0] * 5], np.int32)
    target_mask = np.zeros_like(ids)
    target_mask[0, [2, 7]] = 1  # scattered, not only at the end
    target_mask[1, 4] = 1
    target_mask[2, [1, 2]] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "targets": np.roll(ids, -1, axis=1), "target_mask": target_mask}

    def loss(params, scored):
        return causal_lm_loss(model.config, params, batch, scored_per_row=scored)

    (full, full_metrics), full_grads = jax.value_and_grad(loss, has_aux=True)(model.params, None)
    (part, metrics), grads = jax.value_and_grad(loss, has_aux=True)(model.params, 2)
    np.testing.assert_allclose(part, full, rtol=1e-6)
    for key in ("accuracy", "tokens"):
        np.testing.assert_allclose(metrics[key], full_metrics[key])
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)):
        np.testing.assert_allclose(got, want, atol=1e-6)
