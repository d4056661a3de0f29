"""Jitted beam search for multi-token docids, optionally constrained to a trie of valid docids.

`beam_search` is batched over queries and compiled once per (config, shapes, options): the encoder runs
once, the decoder one position per step with a key/value cache (self-attention keys and values of earlier
positions cached per layer; cross-attention keys and values computed once from the encoder output), all
shapes fixed, the loop a `lax.while_loop` that stops when transformers' beam search would stop.

Without a trie it reproduces transformers' (5.x) ``generate(num_beams=K, num_return_sequences=R,
do_sample=False, early_stopping=..., length_penalty=...)`` for T5: decoder start token
``config.decoder_start_token_id`` (0), EOS ``config.eos_token_id`` (1), ``max_length`` counting the start
token, 2K candidates per step, only the first K candidates may finish, finished scores are the summed
log-probabilities divided by ``generated_length ** length_penalty`` (EOS counted), the same early-stopping
heuristic (``False`` (default), ``True`` or ``"never"``) and the same -1e9 bookkeeping in float32.
Returned sequences start with the start token and are right-padded with ``config.pad_token_id`` after EOS
(transformers pads with EOS there and crops to the longest; `beam_search` keeps ``max_length``).

With a `DocidTrie` every step's candidates are restricted to the tokens the trie allows after each beam's
prefix. Masking convention (default, ``renormalize=False``): log-softmax over the *whole* vocabulary
first, then disallowed tokens set to -inf (exactly what transformers' ``prefix_allowed_tokens_fn`` /
`PrefixConstrainedLogitsProcessor` does, and what DSI implementations use), so a docid's score is the
model's own log-probability of it (divided by the length penalty). ``renormalize=True`` masks the logits
before the log-softmax instead (probabilities renormalised over the allowed tokens; every docid's
probabilities then sum to one). Returned entries that are not complete docids (only when fewer valid
docids than ``num_return`` survive) are all-pad rows with score -inf. One deliberate difference from
transformers under a trie: beams 1..K-1 start dead (-inf) rather than at -1e9, so transformers' -1e9 copies
of the first beam cannot come back as duplicate docids with scores near -1e9 / length; the valid results
are the same (tests/docids/test_decoding.py compares with ``prefix_allowed_tokens_fn``).

Interventions: whole-layer patches of the decoder's component outputs (``decoder.L.hook_attn_out``,
``hook_cross_attn_out``, ``hook_mlp_out``: zero, or one value per decoder position such as the means at
teacher-forced positions; `decoder_output_patches`) apply at every step, as `genir_jax.core.model` applies them
(``out + mask * (value - out)``), so a circuit can be evaluated by retrieval. Other sites are refused (the
decoder step is a separate implementation of `genir_jax.core.model`'s decoder that shares its modules' numerics).
Limitations: no dropout, computation in the parameters' dtype, one EOS id.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genir_jax.core.config import T5Config
from genir_jax.base.errors import GenIRError
from genir_jax.core.model import T5, Params
from genir_jax.core.modules import MLP, RelativePositionBias, RMSNorm
from genir_jax.core.taps import SiteTap

_NEG = -1.0e9  # transformers' "very large negative" bookkeeping value
_OUTPUTS = ("hook_attn_out", "hook_cross_attn_out", "hook_mlp_out")  # the patchable sites, in layer order


def decoder_output_patches(config: T5Config, interventions, length: int):
    """`interventions` (a `genir_jax.interp.interventions` pytree) as the cached decoder step applies them: per
    component output (`_OUTPUTS`) a tuple of ``(mask [L], value [L, length, D])`` float32 pairs, in order;
    None when there is nothing to apply. Only whole-layer patches of the decoder's component outputs with
    one value for every query (a scalar, or per decoder position for at least `length` positions) are
    supported; anything else raises `GenIRError` naming the site."""
    from genir_jax.core.taps import Patch

    if not interventions:
        return None
    layers, width = config.num_decoder_layers, config.d_model
    unknown = [stack for stack in interventions if stack != "decoder"]
    if unknown:
        raise GenIRError(f"beam search: interventions on the {unknown[0]} are not supported (only the decoder's "
                         f"component outputs {', '.join(_OUTPUTS)})")
    unexpected = sorted(set(interventions["decoder"]) - set(_OUTPUTS))
    if unexpected:
        raise GenIRError(f"beam search: decoder.*.{unexpected[0]} cannot be patched during decoding (only "
                         f"{', '.join(_OUTPUTS)})")
    out = []
    for local in _OUTPUTS:
        patches = interventions["decoder"].get(local, ())
        patches = (patches,) if isinstance(patches, Patch) else tuple(patches)
        pairs = []
        for patch in patches:
            mask = np.asarray(patch.mask, np.float32)
            if mask.ndim < 1 or mask.shape[0] != layers or any(n != 1 for n in mask.shape[1:]):
                raise GenIRError(f"beam search: decoder.*.{local}: only whole-layer masks [L, 1, ...] are supported, "
                                 f"got {mask.shape}")
            value = np.asarray(patch.value, np.float32)
            if value.ndim == 0:
                value = np.full((layers, length, width), value, np.float32)
            else:
                per_position = value.ndim == 4 and value.shape[1] == 1 and value.shape[0] in (1, layers) \
                    and value.shape[3] == width and (value.shape[2] == 1 or value.shape[2] >= length)
                if not per_position:
                    raise GenIRError(f"beam search: decoder.*.{local}: the value must be one per layer and decoder "
                                     f"position for every query ([L, 1, >= {length}, D]), got {value.shape}")
                value = np.broadcast_to(value[:, 0, :length], (layers, length, width))
            pairs.append((jnp.asarray(mask.reshape(layers)), jnp.asarray(value)))
        out.append(tuple(pairs))
    return tuple(out) if any(out) else None


def _patched(out, pairs, position):
    """`out` [N, D] of one component at decoder `position` with its patches (mask scalar, value [P, D])."""
    for mask, value in pairs:
        at = jax.lax.dynamic_index_in_dim(value, position, axis=0, keepdims=False).astype(out.dtype)
        out = out + mask.astype(out.dtype) * (at[None, :] - out)
    return out


class DocidTrie:
    """A prefix tree of docids (each a sequence of token ids ending with EOS), as fixed-size arrays.

    States are trie nodes (0: the root, i.e. the empty prefix). Edges are stored CSR-style, sorted by
    (state, token): the children of state ``s`` are ``edge_token[offset[s] : offset[s] + count[s]]`` (tokens
    ascending) leading to ``edge_next[...]``; both edge arrays are padded with `max_children` entries of -1
    so a fixed-size window ``offset[s] + arange(max_children)`` never runs off the end. ``docid_of[s]`` is
    the docid index whose last token (EOS) leads to state ``s``, else -1. Memory is O(total tokens), not
    O(states x vocabulary); a beam-search step builds its logit mask by scattering each beam's window.
    """

    def __init__(self, docids: Sequence[Sequence[int]], eos_id: int = 1):
        seqs = [tuple(int(t) for t in np.asarray(d, dtype=np.int64).reshape(-1)) for d in docids]
        if not seqs:
            raise GenIRError("DocidTrie: no docids given (need at least one)")
        for i, seq in enumerate(seqs):
            if not seq:
                raise GenIRError(f"DocidTrie: docid {i} is empty")
            if min(seq) < 0:
                raise GenIRError(f"DocidTrie: docid {i} has a negative token id ({min(seq)})")
        order = sorted(range(len(seqs)), key=lambda i: seqs[i])
        for a, b in zip(order, order[1:]):  # in sorted order a duplicate or a prefix sits right before
            if seqs[a] == seqs[b]:
                first, second = sorted((a, b))
                raise GenIRError(f"DocidTrie: docid {second} duplicates docid {first} ({list(seqs[a])})")
            if seqs[b][:len(seqs[a])] == seqs[a]:
                raise GenIRError(f"DocidTrie: docid {a} ({list(seqs[a])}) is a proper prefix of docid {b} "
                                 f"({list(seqs[b])}); docids must be prefix-free")
        for i, seq in enumerate(seqs):
            if seq[-1] != eos_id:
                raise GenIRError(f"DocidTrie: docid {i} ({list(seq)}) does not end with EOS (id {eos_id})")
            if eos_id in seq[:-1]:
                raise GenIRError(f"DocidTrie: docid {i} ({list(seq)}) has EOS (id {eos_id}) before its end")

        children: list[dict[int, int]] = [{}]
        docid_of = [-1]
        for i, seq in enumerate(seqs):
            state = 0
            for token in seq:
                nxt = children[state].get(token)
                if nxt is None:
                    nxt = len(children)
                    children[state][token] = nxt
                    children.append({})
                    docid_of.append(-1)
                state = nxt
            docid_of[state] = i
        counts = np.array([len(c) for c in children], dtype=np.int32)
        self.max_children = int(counts.max())
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
        pad = np.full(self.max_children, -1, dtype=np.int32)
        tokens = [np.array(sorted(c), dtype=np.int32) for c in children]
        nexts = [np.array([c[t] for t in sorted(c)], dtype=np.int32) for c in children]
        self.edge_token = np.concatenate(tokens + [pad]).astype(np.int32)
        self.edge_next = np.concatenate(nexts + [pad]).astype(np.int32)
        self.offset = offsets
        self.count = counts
        self.docid_of = np.array(docid_of, dtype=np.int32)
        self.docids = seqs
        self.eos_id = eos_id
        self.num_states = len(children)
        self.max_docid_length = max(len(s) for s in seqs)
        self.max_token = max(max(s) for s in seqs)
        self._index = {s: i for i, s in enumerate(seqs)}

    def __len__(self) -> int:
        return len(self.docids)

    def arrays(self) -> tuple[jnp.ndarray, ...]:
        """(edge_token, edge_next, offset, count, docid_of) as device arrays."""
        return tuple(jnp.asarray(a) for a in (self.edge_token, self.edge_next, self.offset, self.count,
                                               self.docid_of))

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens the trie allows after `prefix` (generated tokens, without the start token); [] if none."""
        state = 0
        for token in prefix:
            start, count = self.offset[state], self.count[state]
            window = self.edge_token[start:start + count]
            hit = np.flatnonzero(window == int(token))
            if not hit.size:
                return []
            state = int(self.edge_next[start + hit[0]])
        return [int(t) for t in self.edge_token[self.offset[state]:self.offset[state] + self.count[state]]]

    def index_of(self, sequences) -> np.ndarray:
        """Docid index of each generated sequence ([..., T] with the start token at position 0, as
        `beam_search` returns them; tokens after the first EOS ignored), -1 where it is no docid."""
        sequences = np.asarray(sequences)
        flat = sequences.reshape(-1, sequences.shape[-1])
        out = np.full(flat.shape[0], -1, dtype=np.int64)
        for row, seq in enumerate(flat):
            tokens = [int(t) for t in seq[1:]]
            if self.eos_id in tokens:
                out[row] = self._index.get(tuple(tokens[:tokens.index(self.eos_id) + 1]), -1)
        return out.reshape(sequences.shape[:-1])


class BeamSearchOutput(NamedTuple):
    """sequences [N, num_return, max_length] (start token first, pad after EOS), best first; scores
    [N, num_return] (summed log-probabilities / generated_length ** length_penalty; -inf: no docid)."""

    sequences: jnp.ndarray
    scores: jnp.ndarray


def beam_search(
    config: T5Config,
    params: Params,
    input_ids,
    attention_mask,
    *,
    num_beams: int = 10,
    max_length: int,
    trie: DocidTrie | None = None,
    num_return: int | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    renormalize: bool = False,
    interventions=None,
) -> BeamSearchOutput:
    """Beam search over queries ``input_ids`` / ``attention_mask`` ([N, S]); see the module docstring.

    `max_length` counts the decoder start token (transformers' meaning): at most ``max_length - 1`` tokens
    are generated. With a `trie` it must leave room for the longest docid. `num_return` defaults to
    `num_beams`. Defaults (``length_penalty=1.0``, ``early_stopping=False``) are transformers'.
    `interventions`: decoder component-output patches applied at every step (`decoder_output_patches`).
    """
    num_return = num_beams if num_return is None else int(num_return)
    if num_beams < 1:
        raise GenIRError(f"beam_search: num_beams must be >= 1, got {num_beams}")
    if not 1 <= num_return <= num_beams:
        raise GenIRError(f"beam_search: num_return must be in 1..num_beams ({num_beams}), got {num_return}")
    if max_length < 2:
        raise GenIRError(f"beam_search: max_length (counting the start token) must be >= 2, got {max_length}")
    if early_stopping not in (True, False, "never"):
        raise GenIRError(f"beam_search: early_stopping must be True, False or 'never', got {early_stopping!r}")
    input_ids = jnp.asarray(input_ids, dtype=jnp.int32)
    attention_mask = jnp.asarray(attention_mask, dtype=jnp.int32)
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise GenIRError(f"beam_search: input_ids and attention_mask must both be [N, S], got "
                         f"{input_ids.shape} and {attention_mask.shape}")
    if trie is not None:
        if trie.eos_id != config.eos_token_id:
            raise GenIRError(f"beam_search: the trie's EOS id {trie.eos_id} is not the model's "
                             f"({config.eos_token_id})")
        if trie.max_token >= config.vocab_size:
            raise GenIRError(f"beam_search: the trie holds token id {trie.max_token}, outside the model's "
                             f"vocabulary of {config.vocab_size}")
        if trie.max_docid_length > max_length - 1:
            raise GenIRError(f"beam_search: max_length {max_length} leaves {max_length - 1} generated tokens, "
                             f"but the longest docid has {trie.max_docid_length}")
        trie_arrays, max_children = trie.arrays(), trie.max_children
    else:
        trie_arrays, max_children = None, 0
    patches = decoder_output_patches(config, interventions, max_length - 1)
    sequences, scores = _beam_search(
        config, params, input_ids, attention_mask, trie_arrays, patches, num_beams=num_beams, max_length=max_length,
        num_return=num_return, length_penalty=float(length_penalty), early_stopping=early_stopping,
        renormalize=bool(renormalize), max_children=max_children)
    return BeamSearchOutput(sequences, scores)


# --------------------------------------------------------------------------------------------------
# One decoder position with a key/value cache
# --------------------------------------------------------------------------------------------------

def _attend(q, k, v, bias, key_mask, out):
    """q [N, H, dk], k / v [N, T, H, dk], bias [1, H, T] or None, key_mask [N|1, 1, T] -> [N, D]
    (the numerics of `genir_jax.core.modules.MultiHeadAttention`)."""
    scores = jnp.einsum("nhk,nthk->nht", q, k)
    if bias is not None:
        scores = scores + bias.astype(scores.dtype)
    scores = jnp.where(key_mask, scores, jnp.finfo(scores.dtype).min)
    pattern = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    z = jnp.einsum("nht,nthk->nhk", pattern, v)
    return jnp.einsum("nhk,hkd->nd", z, out)


def _decoder_step(config: T5Config, params, tokens, position, self_k, self_v, cross_k, cross_v, cross_mask,
                  bias_rows, patches=None):
    """Logits [N, V] for `tokens` [N] at decoder `position` (traced), and the updated self-attention
    caches [L, N, T, H, dk]. cross_k / cross_v [L, N, S, H, dk]; cross_mask [N, 1, S] bool;
    bias_rows [T, H, T] (the causal relative position bias of every query position); `patches`: from
    `decoder_output_patches`, or None."""
    cfg = config
    dec = params["decoder"]
    length = self_k.shape[2]
    bias = jax.lax.dynamic_index_in_dim(bias_rows, position, axis=0, keepdims=True)  # [1, H, T]
    causal = (jnp.arange(length) <= position)[None, None, :]
    x = jnp.take(params["shared"], tokens, axis=0)
    mlp = MLP(d_model=cfg.d_model, d_ff=cfg.d_ff, activation=cfg.dense_act_fn, gated=cfg.is_gated_act)
    norm = RMSNorm(epsilon=cfg.layer_norm_epsilon)
    no_tap = SiteTap(None).scoped("mlp.")

    layer_patches = ((), (), ()) if patches is None else patches  # scanned: [L] / [L, P, D] leaves

    def layer(x, xs):
        lp, k_cache, v_cache, ck, cv, own = xs
        sa = lp["self_attn"]
        h = norm.apply({"params": lp["self_attn_norm"]}, x)
        q = jnp.einsum("nd,dhk->nhk", h, sa["query"])
        k_new = jnp.einsum("nd,dhk->nhk", h, sa["key"])
        v_new = jnp.einsum("nd,dhk->nhk", h, sa["value"])
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k_new[:, None], position, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v_new[:, None], position, axis=1)
        x = x + _patched(_attend(q, k_cache, v_cache, bias, causal, sa["out"]), own[0], position)
        ca = lp["cross_attn"]
        h = norm.apply({"params": lp["cross_attn_norm"]}, x)
        q = jnp.einsum("nd,dhk->nhk", h, ca["query"])
        x = x + _patched(_attend(q, ck, cv, None, cross_mask, ca["out"]), own[1], position)
        h = norm.apply({"params": lp["mlp_norm"]}, x)
        x = x + _patched(mlp.apply({"params": lp["mlp"]}, h, no_tap), own[2], position)
        return x, (k_cache, v_cache)

    x, (self_k, self_v) = jax.lax.scan(layer, x, (dec["layers"], self_k, self_v, cross_k, cross_v, layer_patches))
    x = norm.apply({"params": dec["final_norm"]}, x)
    logits = T5(cfg).apply({"params": params}, x, method=T5.unembed)
    return logits.astype(jnp.float32), self_k, self_v


def _bias_rows(config: T5Config, params, length: int):
    """[T, H, T]: row t is the decoder's relative position bias of query position t over keys 0..T-1."""
    bias = RelativePositionBias(
        num_buckets=config.relative_attention_num_buckets, max_distance=config.relative_attention_max_distance,
        num_heads=config.num_heads, bidirectional=False,
    ).apply({"params": params["decoder"]["relpos_bias"]}, length, length)  # [1, H, T, T]
    return jnp.transpose(bias[0], (1, 0, 2))


# --------------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------------

def _gather(x, index):
    """x [B, K, ...] gathered along axis 1 by index [B, J] -> [B, J, ...]."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _trie_window(trie, states, max_children):
    """Allowed tokens of each state [...] as a padded window [..., max_children] (-1 beyond the count;
    dead states (-1) allow nothing)."""
    edge_token, _, offset, count, _ = trie
    safe = jnp.maximum(states, 0)
    slots = jnp.arange(max_children, dtype=jnp.int32).reshape((1,) * states.ndim + (max_children,))
    idx = offset[safe][..., None] + slots
    valid = slots < jnp.where(states >= 0, count[safe], 0)[..., None]
    return jnp.where(valid, edge_token[idx], -1)


def _trie_next(trie, states, tokens, max_children):
    """The state after `tokens` from `states` (both [...]), -1 where the trie does not allow it."""
    edge_token, edge_next, offset, count, _ = trie
    safe = jnp.maximum(states, 0)
    lo = offset[safe]
    hi = lo + jnp.where(states >= 0, count[safe], 0)
    start = lo
    for _ in range(max(1, int(max_children).bit_length())):  # lower bound of `tokens` in [lo, hi)
        active = lo < hi
        mid = (lo + hi) // 2
        less = edge_token[mid] < tokens
        lo = jnp.where(active & less, mid + 1, lo)
        hi = jnp.where(active & ~less, mid, hi)
    found = (lo < start + jnp.where(states >= 0, count[safe], 0)) & (edge_token[lo] == tokens) & (states >= 0)
    return jnp.where(found, edge_next[lo], -1)


@functools.partial(jax.jit, static_argnames=("config", "num_beams", "max_length", "num_return", "length_penalty",
                                             "early_stopping", "renormalize", "max_children"))
def _beam_search(config, params, input_ids, attention_mask, trie, patches, *, num_beams, max_length, num_return,
                 length_penalty, early_stopping, renormalize, max_children):
    cfg = config
    B, K, T, V = input_ids.shape[0], num_beams, max_length, cfg.vocab_size
    steps = T - 1  # decoder input positions 0..T-2; the token chosen at step i goes to position i + 1
    eos, pad = cfg.eos_token_id, cfg.pad_token_id
    heads, d_kv, layers = cfg.num_heads, cfg.d_kv, cfg.num_decoder_layers

    encoded, _ = T5(cfg).apply({"params": params}, input_ids, attention_mask, None, method=T5.encode)
    encoded = jnp.repeat(encoded, K, axis=0)  # [B*K, S, D], beam-major within a query
    cross_mask = jnp.repeat(attention_mask.astype(bool), K, axis=0)[:, None, :]
    cross = params["decoder"]["layers"]["cross_attn"]
    cross_k = jnp.einsum("nsd,ldhk->lnshk", encoded, cross["key"])
    cross_v = jnp.einsum("nsd,ldhk->lnshk", encoded, cross["value"])
    bias_rows = _bias_rows(cfg, params, steps)
    cache_shape = (layers, B * K, steps, heads, d_kv)
    dtype = encoded.dtype

    # Python-float powers cast to float32, as transformers divides float32 scores by Python floats.
    finish_denominator = jnp.asarray(np.array([float(n) ** length_penalty for n in range(1, T + 1)], np.float32))
    if early_stopping == "never" and length_penalty > 0.0:
        heuristic_denominator = jnp.full((T,), np.float32(float(T - 1) ** length_penalty))
    else:
        heuristic_denominator = finish_denominator
    candidates = 2 * K  # max(2, 1 + number of EOS ids) * num_beams
    top_num_beam = jnp.arange(candidates) < K

    running_seqs = jnp.full((B, K, T), pad, jnp.int32).at[:, :, 0].set(cfg.decoder_start_token_id)
    running_scores = jnp.zeros((B, K), jnp.float32).at[:, 1:].set(_NEG)
    init = dict(
        i=jnp.asarray(0, jnp.int32), go=jnp.asarray(True),
        running_seqs=running_seqs, running_scores=running_scores,
        # with a trie, beams 1..K-1 start dead (-inf) instead of at -1e9: transformers' -1e9 copies of beam 0
        # would otherwise come back as finite-scored duplicates when fewer docids than beams survive
        running_state=jnp.zeros((B, K), jnp.int32).at[:, 1:].set(-1),
        seqs=running_seqs, scores=jnp.full((B, K), _NEG, jnp.float32), finished=jnp.zeros((B, K), bool),
        finished_state=jnp.full((B, K), -1, jnp.int32),
        unsatisfied=jnp.ones((B, 1), bool),
        self_k=jnp.zeros(cache_shape, dtype), self_v=jnp.zeros(cache_shape, dtype),
    )

    def body(c):
        i = c["i"]
        cur_len = i + 1  # tokens in the running sequences, start token included
        tokens = c["running_seqs"][:, :, i].reshape(B * K)
        logits, self_k, self_v = _decoder_step(cfg, params, tokens, i, c["self_k"], c["self_v"], cross_k, cross_v,
                                               cross_mask, bias_rows, patches)
        logits = logits.reshape(B, K, V)
        if trie is not None:
            window = _trie_window(trie, c["running_state"], max_children)  # [B, K, C]
            rows = jnp.arange(B * K, dtype=jnp.int32)[:, None]
            allowed = jnp.zeros((B * K, V), bool).at[rows, jnp.where(window >= 0, window, V).reshape(B * K, -1)].set(
                True, mode="drop").reshape(B, K, V)
            if renormalize:
                log_probs = jax.nn.log_softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
            else:
                log_probs = jnp.where(allowed, jax.nn.log_softmax(logits, axis=-1), -jnp.inf)
        else:
            log_probs = jax.nn.log_softmax(logits, axis=-1)
        accumulated = (log_probs + c["running_scores"][:, :, None]).reshape(B, K * V)

        # c. top 2K continuations of all beams
        top_scores, top_index = jax.lax.top_k(accumulated, candidates)
        beam = top_index // V
        token = (top_index % V).astype(jnp.int32)
        top_seqs = jax.lax.dynamic_update_slice_in_dim(_gather(c["running_seqs"], beam), token[:, :, None],
                                                       cur_len, axis=2)
        top_state = (_trie_next(trie, _gather(c["running_state"], beam), token, max_children)
                     if trie is not None else jnp.zeros_like(token))
        # d. stopping criteria: EOS, or max_length reached
        hits = (token == eos) | (cur_len + 1 >= T)

        # e. the best K unfinished continuations run on
        running_log_probs = top_scores + hits.astype(jnp.float32) * _NEG
        _, keep = jax.lax.top_k(running_log_probs, K)
        running_seqs = _gather(top_seqs, keep)
        running_scores = _gather(running_log_probs, keep)
        running_state = _gather(top_state, keep)
        source = _gather(beam, keep)  # [B, K]: the beam each new running beam extends

        # f. finished hypotheses
        did_finish = hits & top_num_beam[None, :]
        finish_scores = top_scores / finish_denominator[i]
        full = jnp.all(c["finished"], axis=-1, keepdims=True) & (early_stopping is True)
        finish_scores = finish_scores + full.astype(jnp.float32) * _NEG
        finish_scores = finish_scores + (~c["unsatisfied"]).astype(jnp.float32) * _NEG
        finish_scores = finish_scores + (~did_finish).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([c["scores"], finish_scores], axis=1)
        _, best = jax.lax.top_k(merged_scores, K)
        seqs = _gather(jnp.concatenate([c["seqs"], top_seqs], axis=1), best)
        scores = _gather(merged_scores, best)
        finished = _gather(jnp.concatenate([c["finished"], did_finish], axis=1), best)
        finished_state = _gather(jnp.concatenate([c["finished_state"], top_state], axis=1), best)

        # g. reorder the caches; early-stopping heuristic; loop condition
        flat_source = (source + jnp.arange(B, dtype=source.dtype)[:, None] * K).reshape(B * K)
        self_k = jnp.take(self_k, flat_source, axis=1)
        self_v = jnp.take(self_v, flat_source, axis=1)
        best_possible = running_scores[:, :1] / heuristic_denominator[i]
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
        unsatisfied = c["unsatisfied"] & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
        go = (jnp.any(unsatisfied) & ~(jnp.all(finished) & (early_stopping is True)) & ~jnp.all(hits)
              & (i + 1 < steps))
        return dict(i=i + 1, go=go, running_seqs=running_seqs, running_scores=running_scores,
                    running_state=running_state, seqs=seqs, scores=scores, finished=finished,
                    finished_state=finished_state, unsatisfied=unsatisfied, self_k=self_k, self_v=self_v)

    out = jax.lax.while_loop(lambda c: c["go"], body, init)
    seqs, scores = out["seqs"][:, :num_return], out["scores"][:, :num_return]
    # pad after the first EOS (transformers leaves its fill value, EOS, there)
    generated = seqs[:, :, 1:]
    after_eos = jnp.cumsum((generated == eos).astype(jnp.int32), axis=-1) - (generated == eos).astype(jnp.int32)
    seqs = seqs.at[:, :, 1:].set(jnp.where(after_eos > 0, pad, generated))
    if trie is not None:
        docid_of = trie[4]
        state = out["finished_state"][:, :num_return]
        valid = (out["finished"][:, :num_return] & jnp.isfinite(scores) & (state >= 0)
                 & (docid_of[jnp.maximum(state, 0)] >= 0))
        seqs = jnp.where(valid[:, :, None], seqs, pad)
        scores = jnp.where(valid, scores, -jnp.inf)
    return seqs, scores


__all__ = ["BeamSearchOutput", "DocidTrie", "beam_search", "decoder_output_patches"]
