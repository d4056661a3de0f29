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

Interventions (a `genir_jax.interp.interventions` pytree, validated as for a forward over ``max_length - 1``
decoder positions) apply to the encoder once and to the decoder at every step, through the model's own
decoding mode (`genir_jax.core.model.T5.decode_step`: the same layers as a teacher-forced forward, with a
key/value cache): every site, head, neuron and position the site grammar accepts; a patch with a decoder
position axis applies at the step's position, as a teacher-forced forward applies it there; per-query
values (batch axis N) follow the query's beams. So a circuit can be evaluated by retrieval.
Limitations: no dropout, computation in the parameters' dtype, one EOS id. A decoder patch that reads
later positions (e.g. self-attention scores on keys after the query) sees the cache's zeros there.

Decoder-only models (a `DecoderConfig`: GPT-2, Llama, Qwen2) go through the same search: the prompts run once
(`genir_jax.core.decoder_only.decode_step` at slot 0, the key/value cache then repeated for every beam), then
one token per step. Column 0 of the returned sequences is each prompt's last token (in the place of T5's start
token), so `max_length` again counts one more than the generated tokens and `DocidTrie.index_of` reads both
alike; padding after EOS is the model's ``pad_token_id``, else its EOS (what transformers pads with). The first
step's logits are those at each prompt's last real token (`last_positions`), so prompts may be left- or
right-padded (the DSI layout), with the same result. It equals transformers' ``generate(num_beams=K,
max_new_tokens=max_length - 1, prefix_allowed_tokens_fn=..., ...)`` on left-padded prompts, whose generated
length (the length penalty's) excludes the prompt (tests/docids/test_decoder_only_decoding.py).
Interventions (stack ``blocks``) apply to the prompt and to every step, validated as for a forward over the
cache's ``S + max_length - 2`` slots: a position axis indexes cache slots (the prompt's columns, then the
generated tokens), so with right-padded prompts a patch meant for the first generated token's sequence
position is not at that slot; per-query values follow the query's beams.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genir_jax.core.config import T5Config
from genir_jax.core.decoder_config import DecoderConfig
from genir_jax.core.decoder_only import DecoderOnlyCache, decode_step, init_kv_cache, last_positions
from genir_jax.base.errors import GenIRError
from genir_jax.core.model import T5, Params
from genir_jax.core.sites import BLOCKS, STACK_SITES
from genir_jax.core.taps import Patch
from genir_jax.core.validation import validate

_NEG = -1.0e9  # transformers' "very large negative" bookkeeping value


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
    config: T5Config | DecoderConfig,
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

    `config`: a `T5Config` or a decoder-only `DecoderConfig` (prompts ``input_ids``, left- or right-padded).
    `max_length` counts the decoder start token (transformers' meaning; for a decoder-only model, the prompt's
    last token, i.e. ``max_new_tokens + 1``): at most ``max_length - 1`` tokens are generated. With a `trie` it must leave room for the longest docid. `num_return` defaults to
    `num_beams`. Defaults (``length_penalty=1.0``, ``early_stopping=False``) are transformers'.
    `interventions`: patches of any encoder or decoder site (see the module docstring).
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
    if isinstance(config, DecoderConfig) and config.eos_token_id is None:
        raise GenIRError("beam_search: the decoder-only model has no eos_token_id (its config.json names none)")
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
    options = dict(num_beams=num_beams, max_length=max_length, num_return=num_return,
                   length_penalty=float(length_penalty), early_stopping=early_stopping,
                   renormalize=bool(renormalize), max_children=max_children)
    if isinstance(config, DecoderConfig):
        slots = input_ids.shape[1] + max_length - 2  # the prompt, then every generated token but the last
        if interventions:
            validate(config, interventions, input_ids.shape[0], slots, slots)
        blocks = dict((interventions or {}).get(BLOCKS) or {}) or None
        sequences, scores = _decoder_only_beam_search(
            config, params, input_ids, attention_mask, blocks, _follow_beams(blocks, input_ids.shape[0], num_beams),
            trie_arrays, **options)
        return BeamSearchOutput(sequences, scores)
    if interventions:
        validate(config, interventions, input_ids.shape[0], input_ids.shape[1], max_length - 1)
    interventions = {stack: dict(sites) for stack, sites in (interventions or {}).items()}
    sequences, scores = _beam_search(
        config, params, input_ids, attention_mask, interventions.get("encoder"),
        _follow_beams(interventions.get("decoder"), input_ids.shape[0], num_beams), trie_arrays, **options)
    return BeamSearchOutput(sequences, scores)


def _follow_beams(decoder_interventions, queries: int, num_beams: int):
    """Decoder patches for the beam-major rows (query i's beams are rows i*K .. i*K+K-1): arrays with a
    batch axis of one entry per query are repeated for each of its beams."""
    if not decoder_interventions:
        return None

    def repeat(leaf, axis):
        shape = np.shape(leaf)
        if len(shape) <= axis or shape[axis] != queries or queries == 1:
            return leaf
        return jnp.repeat(jnp.asarray(leaf), num_beams, axis=axis)

    out = {}
    for local, patches in decoder_interventions.items():
        axis = 0 if local in STACK_SITES else 1  # layer sites: [L, N, ...]
        patches = (patches,) if isinstance(patches, Patch) else tuple(patches)
        out[local] = tuple(Patch(*(repeat(leaf, axis) for leaf in patch)) for patch in patches)
    return out


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


def _search(first_logits, cache, first_tokens, advance, reorder, trie, *, num_beams, max_length, num_return,
            length_penalty, early_stopping, renormalize, max_children, eos, pad):
    """The search shared by both model families (traced inside their jitted entry points).

    `first_logits` [B*K, V]: each beam's logits for the first generated token (beam-major rows); `first_tokens`
    [B]: column 0 of the returned sequences; `advance(i, tokens [B*K], cache)` -> (logits [B*K, V] of the
    token after `tokens`, the i-th sequence column, cache) runs the model one token; `reorder(cache, rows)`
    gathers the cache's beam rows. Returns (sequences [B, R, T], scores [B, R])."""
    B, K, T = first_tokens.shape[0], num_beams, max_length
    V = first_logits.shape[-1]
    steps = T - 1  # generated tokens at most; the token chosen at step i goes to column i + 1

    # Python-float powers cast to float32, as transformers divides float32 scores by Python floats.
    finish_denominator = jnp.asarray(np.array([float(n) ** length_penalty for n in range(1, T + 1)], np.float32))
    if early_stopping == "never" and length_penalty > 0.0:
        heuristic_denominator = jnp.full((T,), np.float32(float(T - 1) ** length_penalty))
    else:
        heuristic_denominator = finish_denominator
    candidates = 2 * K  # max(2, 1 + number of EOS ids) * num_beams
    top_num_beam = jnp.arange(candidates) < K

    running_seqs = jnp.full((B, K, T), pad, jnp.int32).at[:, :, 0].set(first_tokens.astype(jnp.int32)[:, None])
    running_scores = jnp.zeros((B, K), jnp.float32).at[:, 1:].set(_NEG)
    init = dict(
        i=jnp.asarray(0, jnp.int32), go=jnp.asarray(True),
        running_seqs=running_seqs, running_scores=running_scores,
        # with a trie, beams 1..K-1 start dead (-inf) instead of at -1e9: transformers' -1e9 copies of beam 0
        # would otherwise come back as finite-scored duplicates when fewer docids than beams survive
        running_state=jnp.zeros((B, K), jnp.int32).at[:, 1:].set(-1),
        seqs=running_seqs, scores=jnp.full((B, K), _NEG, jnp.float32), finished=jnp.zeros((B, K), bool),
        finished_state=jnp.full((B, K), -1, jnp.int32),
        unsatisfied=jnp.ones((B, 1), bool), cache=cache, logits=first_logits.astype(jnp.float32),
    )

    def body(c):
        i = c["i"]
        cur_len = i + 1  # columns filled in the running sequences, column 0 included
        logits = c["logits"].reshape(B, K, V)
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

        # g. reorder the caches; early-stopping heuristic; loop condition; the next token's logits
        flat_source = (source + jnp.arange(B, dtype=source.dtype)[:, None] * K).reshape(B * K)
        cache = reorder(c["cache"], flat_source)
        best_possible = running_scores[:, :1] / heuristic_denominator[i]
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
        unsatisfied = c["unsatisfied"] & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
        go = (jnp.any(unsatisfied) & ~(jnp.all(finished) & (early_stopping is True)) & ~jnp.all(hits)
              & (i + 1 < steps))
        next_logits, cache = jax.lax.cond(
            go, lambda cc: advance(i + 1, running_seqs[:, :, i + 1].reshape(B * K), cc),
            lambda cc: (c["logits"], cc), cache)
        return dict(i=i + 1, go=go, running_seqs=running_seqs, running_scores=running_scores,
                    running_state=running_state, seqs=seqs, scores=scores, finished=finished,
                    finished_state=finished_state, unsatisfied=unsatisfied, cache=cache,
                    logits=next_logits.astype(jnp.float32))

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


_SEARCH_OPTIONS = ("num_beams", "max_length", "num_return", "length_penalty", "early_stopping", "renormalize",
                   "max_children")


@functools.partial(jax.jit, static_argnames=("config",) + _SEARCH_OPTIONS)
def _beam_search(config, params, input_ids, attention_mask, encoder_patches, decoder_patches, trie=None, **options):
    """T5: the encoder once, then the decoder from its start token, one position per step."""
    cfg, K = config, options["num_beams"]
    model, variables = T5(cfg), {"params": params}
    decoder_patches = {"decoder": decoder_patches} if decoder_patches else None

    encoded, _ = model.apply(variables, input_ids, attention_mask,
                             {"encoder": encoder_patches} if encoder_patches else None, method=T5.encode)
    encoded = jnp.repeat(encoded, K, axis=0)  # [B*K, S, D], beam-major within a query
    beam_mask = jnp.repeat(attention_mask, K, axis=0)
    cache = model.apply(variables, encoded, options["max_length"] - 1, decoder_patches,
                        method=T5.init_decode_cache)

    def advance(position, tokens, cache):
        logits, cache = model.apply(variables, tokens, position, cache, beam_mask, decoder_patches,
                                    method=T5.decode_step)
        return logits.astype(jnp.float32), cache

    def reorder(cache, rows):
        return cache._replace(self_k=jnp.take(cache.self_k, rows, axis=1),
                              self_v=jnp.take(cache.self_v, rows, axis=1))

    start = jnp.full((input_ids.shape[0] * K,), cfg.decoder_start_token_id, jnp.int32)
    first_logits, cache = advance(0, start, cache)
    return _search(first_logits, cache, start[::K], advance, reorder, trie, eos=cfg.eos_token_id,
                   pad=cfg.pad_token_id, **options)


@functools.partial(jax.jit, static_argnames=("config",) + _SEARCH_OPTIONS)
def _decoder_only_beam_search(config, params, input_ids, attention_mask, prompt_patches, beam_patches, trie=None,
                              **options):
    """Decoder-only: the prompts once (their cache repeated for every beam), then one token per step."""
    K, T = options["num_beams"], options["max_length"]
    B, S = input_ids.shape
    slots = S + T - 2  # the prompt, then every generated token but the last
    key_mask = jnp.concatenate([attention_mask, jnp.ones((B, T - 2), jnp.int32)], axis=1)
    cache = init_kv_cache(config, B, slots, dtype=params["embed"].dtype)
    logits, cache = decode_step(config, params, input_ids, cache, 0, key_mask,
                                {BLOCKS: prompt_patches} if prompt_patches else None)
    last = last_positions(attention_mask)
    rows = jnp.arange(B)
    first_logits = jnp.repeat(logits[rows, last].astype(jnp.float32), K, axis=0)
    cache = DecoderOnlyCache(*(jnp.repeat(a, K, axis=1) for a in cache))
    beam_key_mask = jnp.repeat(key_mask, K, axis=0)

    def advance(column, tokens, cache):  # generated token `column` goes to the slot after the prompt's
        logits, cache = decode_step(config, params, tokens[:, None], cache, S + column - 1, beam_key_mask,
                                    {BLOCKS: beam_patches} if beam_patches else None)
        return logits[:, 0].astype(jnp.float32), cache

    def reorder(cache, rows):
        return DecoderOnlyCache(jnp.take(cache.k, rows, axis=1), jnp.take(cache.v, rows, axis=1))

    pad = config.eos_token_id if config.pad_token_id is None else config.pad_token_id
    return _search(first_logits, cache, input_ids[rows, last], advance, reorder, trie, eos=config.eos_token_id,
                   pad=pad, **options)


__all__ = ["BeamSearchOutput", "DocidTrie", "beam_search"]
