"""The training step's faster computations give what the plain ones give: folded cross-attention, the
batch-shared position bias as a product with ones, unrolled layers, and the cross-entropy / accuracy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genir_jax.core.config import t5_v1_0
from genir_jax.core.model import forward, forward_with_cache, init_params
from genir_jax.core.modules import MultiHeadAttention, _batch_broadcast, folding_keys_is_cheaper
from genir_jax.core.taps import SiteTap
from genir_jax.training.loop import cross_entropy, seq2seq_loss

CONFIG = t5_v1_0(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
                 dropout_rate=0.1)


@functools.lru_cache(maxsize=None)
def _params():
    return init_params(CONFIG, 0)


def _batch(targets: int = 1, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 90, size=(4, 24)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 15:] = 0
    ids[0, 15:] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "targets": rng.integers(2, 96, size=(4, targets)).astype(np.int32),
            "target_mask": np.ones((4, targets), np.int32)}


def test_folding_is_chosen_only_where_it_is_cheaper():
    assert folding_keys_is_cheaper(1, 128, 128, 4, 32)  # a DSI decoder step reading 128 encoder tokens
    assert folding_keys_is_cheaper(4, 128, 1024, 16, 64)
    assert not folding_keys_is_cheaper(128, 128, 128, 4, 32)  # self-attention over a whole input
    assert not folding_keys_is_cheaper(64, 32, 128, 4, 32)


@pytest.mark.parametrize("query_length", [1, 2])
def test_folded_attention_equals_projected_attention(query_length):
    attention = MultiHeadAttention(num_heads=4, d_kv=8, d_model=32)
    rng = np.random.default_rng(1)
    queries = jnp.asarray(rng.normal(size=(3, query_length, 32)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(3, 20, 32)), jnp.float32)
    key_mask = jnp.asarray(np.arange(20)[None, None, None, :] < np.array([20, 13, 7])[:, None, None, None])
    variables = attention.init(jax.random.PRNGKey(0), queries, keys, None, key_mask, SiteTap(None).scoped(""))
    folded = attention.clone(fold_keys=True)

    def out(module, variables, queries, keys):
        return module.apply(variables, queries, keys, None, key_mask, SiteTap(None).scoped(""))

    np.testing.assert_allclose(out(folded, variables, queries, keys), out(attention, variables, queries, keys),
                               rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda v, q, k, m=module: jnp.sum(jnp.sin(out(m, v, q, k))), argnums=(0, 1, 2))(
        variables, queries, keys) for module in (folded, attention)]
    for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_folded_model_forward_and_its_taps():
    params, batch = _params(), _batch()
    args = (CONFIG, params, batch["input_ids"], batch["attention_mask"], np.zeros((4, 1), np.int32))
    plain = forward(*args)
    folded = forward(*args, fold_cross_attention=True)
    np.testing.assert_allclose(folded, plain, rtol=1e-5, atol=1e-5)
    # sites of the folded path are still recorded; asking for keys or values projects them as before
    sites = ["decoder.1.cross_attn.hook_pattern", "decoder.1.cross_attn.hook_z", "decoder.2.cross_attn.hook_k"]
    _, cache = forward_with_cache(*args, cache_sites=sites, fold_cross_attention=True)
    _, expected = forward_with_cache(*args, cache_sites=sites)
    for site in sites:
        np.testing.assert_allclose(cache[site], expected[site], rtol=1e-5, atol=1e-6)


def test_batch_shared_bias_as_product_with_ones():
    bias = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 5, 5))
    scores = jax.random.normal(jax.random.PRNGKey(1), (6, 4, 5, 5))
    np.testing.assert_array_equal(_batch_broadcast(bias, 6), jnp.broadcast_to(bias, scores.shape))
    weights = jax.random.normal(jax.random.PRNGKey(2), scores.shape)
    ours = jax.grad(lambda b: jnp.sum(jax.nn.softmax(scores + _batch_broadcast(b, 6)) * weights))(bias)
    plain = jax.grad(lambda b: jnp.sum(jax.nn.softmax(scores + b) * weights))(bias)
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-6)
    full = jnp.ones((6, 4, 5, 5))
    assert _batch_broadcast(full, 6) is full  # a per-example bias is left alone


@pytest.mark.parametrize("targets", [1, 3])
def test_unrolled_folded_loss_and_gradients_match_the_plain_forward(targets):
    params, batch = _params(), _batch(targets)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    rng = jax.random.PRNGKey(5)

    def plain_loss(p):
        logits = forward(CONFIG, p, batch["input_ids"], batch["attention_mask"],
                         jnp.concatenate([jnp.zeros((4, 1), jnp.int32), batch["targets"][:, :-1]], axis=1),
                         deterministic=False, dropout_rng=rng)
        return cross_entropy(logits, batch["targets"], batch["target_mask"])[0]

    def fast_loss(p):
        return seq2seq_loss(CONFIG, p, batch, dropout_rng=rng, unroll_layers=True)[0]

    value_plain, grads_plain = jax.value_and_grad(plain_loss)(params)
    value_fast, grads_fast = jax.value_and_grad(fast_loss)(params)
    assert float(value_fast) == pytest.approx(float(value_plain), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(grads_fast), jax.tree_util.tree_leaves(grads_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_cross_entropy_equals_log_softmax_and_argmax_with_ties():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 11)).astype(np.float32)
    logits[0, 0, [2, 5]] = 9.0  # a tie for the maximum: argmax takes index 2
    logits[0, 1, [2, 5]] = 9.0
    logits[1, 2, :] = 1.0  # all equal
    targets = np.array([[2, 5, 1, 0], [3, 4, 0, 7], [10, 1, 2, 3]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 1, 1]])
    loss, metrics = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = np.argmax(logits, axis=-1) == targets
    assert correct[0, 0] and not correct[0, 1] and correct[1, 2]
    assert float(loss) == pytest.approx(float((nll * mask).sum() / mask.sum()), rel=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(float((correct * mask).sum() / mask.sum()))
    assert float(metrics["tokens"]) == mask.sum()
