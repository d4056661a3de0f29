"""Attribution patching: estimate every config of a sweep from one forward and one backward pass.

AtP (Nanda 2023; Kramár et al. 2024): the effect on a metric M of patching an activation x to a value v
is estimated to first order as ``grad_x M . (v - x)``. With genir-jax's patches,
``y = x + mask * (value - x)``, that product is exactly the gradient of M with respect to the mask at
mask = 0, element by element. So attribution reuses the sweep's own configs: every term of the sweep gets
a zero mask of the site's full shape, one backward pass gives the gradient density ``g * (v - x)`` for
every element of every swept site, and each config's estimate is that density summed under its mask
(a head: its slice of ``hook_z``; a neuron: its entry of ``mlp.hook_post``; a component: its output).
Modes (zero, mean, resample / another model via `FROM_SOURCE`) only change v.

AtP* (Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to
components") adds two fixes, both implemented:
- QK fix (attention saturation): where a patch changes attention queries, keys or scores, the linear
  estimate through the softmax is replaced by the exact change of the attention pattern, linearised only
  after the pattern (the gradient at the pattern times the pattern's exact change):
  * ``attn.hook_q`` / ``hook_k`` / ``hook_attn_scores`` (both stacks) and ``cross_attn.hook_q`` / ``hook_k``
    / ``hook_attn_scores``: per config and layer, the patched scores (q' k, q k' or the patched scores
    themselves) go through the softmax exactly (`_score_qk_scores`); they reach the output through nothing
    else.
  * ``encoder.hook_out`` and ``encoder_final_ln.hook_normalized`` (hook_out = normalized x the norm's
    scale, so the same patch there): every decoder layer's cross-attention keys and values read it; each
    cross-attention pattern is recomputed exactly with the patched keys, plus the (linear) value path
    (`_encoder_qk_scores`; single-token docids only, positions patched whole).
  * ``hook_pattern``: the softmax is upstream of the patched pattern, so AtP's estimate (linear from the
    pattern on) already is AtP*'s.
  * Head outputs, values, neurons and component outputs are not queries or keys: AtP*'s QK fix (which the
    paper defines for query and key nodes) leaves them unchanged, as it does the decoder residual stream.
  * Encoder residual sites (``hook_resid_*``) and ``encoder.hook_embed`` reach every later self-attention's
    queries and keys and the cross-attention keys through norms and further softmaxes: there is no QK fix
    for them yet, and ``atp*`` refuses them (use ``atp`` or an exact sweep); never plain AtP under the name.
- GradDrop (cancellation): for each decoder layer l the gradient is recomputed with layer l's residual
  contributions blocked (their outputs patched to their own clean values, which keeps the forward and
  zeroes the gradient through them). The paper defines, per prompt pair (x_clean, x_noise),
  ``I_AtP+GD(n) := 1/(L-1) sum_{l=1..L} |I_AtP+GD_l(n)|`` with
  ``I_AtP+GD_l(n) := (n(x_noise) - n(x_clean))^T dL^l/dn(x_clean)``, L^l the metric with the gradient
  through layer l's output set to zero: the absolute value is taken per query (prompt pair), then the
  magnitude is the mean over queries. L - 1 counts the variants that can be non-zero: a node inside layer
  l (its attention, cross-attention or MLP) has every path blocked when layer l is dropped. Nodes outside
  every decoder layer's blocks (encoder sites, decoder residual and stack sites) have L such variants, so
  they are divided by L (`_own_layer_counts`), else they would be inflated by L / (L - 1). The forward
  pass is shared: the plain gradient minus the gradient of the paths through layer l's outputs (see
  `_gradients_body`) is each variant, so the L variants cost one vmapped backward pass and no forward.

Decoder-only models (GPT-2, Llama, Qwen2; sites ``blocks.*``): the same estimates on the prompt, read at its last
real token (`genir_jax.interp.patching.prediction_states`), with the limits of their sweeps (no ``hook_embed``,
atomic docids) and, unlike the exact sweep, no `FROM_SOURCE` values yet. The QK fix of ``attn.hook_q`` / ``hook_k`` rotates the change
(Llama / Qwen2: the sites are before the rotary embedding), repeats grouped keys over their query heads and
scales by ``d_kv ** -0.5`` (`_score_change`); GradDrop drops each layer's attention and MLP outputs; their
residual stream (``blocks.*.hook_resid_*``) has no QK fix yet and ``atp*`` refuses it.

`attribute` returns signed estimates (``scores``: AtP, QK-fixed for atp*), ``absolute`` (|AtP|: the mean
over queries of |the per-query estimate|, QK-fixed for atp*, no GradDrop; what GradDrop is compared with)
and, for atp*, the GradDrop magnitudes; rank units by `ranking` (|scores| for atp, magnitudes for atp*).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from genir_jax.base.progress import compiling_bar

from genir_jax.base.batching import batches
from genir_jax.core.config import T5Config
from genir_jax.interp.interventions import FromSource, InterventionError
from genir_jax.core import decoder_only
from genir_jax.core.decoder_modules import rotate
from genir_jax.core.model import T5, forward_with_cache as t5_forward_with_cache
from genir_jax.scale.partitioning import Partitioner, current, maybe_activate, put_rows
from genir_jax.interp.metrics import DIFFERENTIABLE_METRICS, METRIC_TABLE
from genir_jax.interp.patching import (
    Source, check_decoder_only_sweep, check_sequences, check_token_ids, decoder_inputs, final_metrics, logical_axes,
    plan_terms, prediction_states, source_site_names, validate_terms,
)
from genir_jax.core.sites import ALL_LAYERS, Site, is_decoder_only, num_layers, site_name, site_shape, stacks
from genir_jax.interp.sweep import Sweep, Term, as_sweep
from genir_jax.core.taps import Patch, Shift

METHODS = ("atp", "atp*")
_DROP_SITES = ("hook_attn_out", "hook_cross_attn_out", "hook_mlp_out")
_BLOCK_DROP_SITES = ("hook_attn_out", "hook_mlp_out")  # a decoder-only layer's outputs (no cross-attention)
# AtP*'s QK fix: sites whose patch changes one attention's scores (recomputed exactly, see `_score_qk_scores`)
_QK_LOCALS = tuple(f"{a}.{s}" for a in ("attn", "cross_attn") for s in ("hook_q", "hook_k", "hook_attn_scores"))
_RESIDUAL_LOCALS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_mid_cross", "hook_resid_post")
_UNFIXED_STACK_LOCALS = ("hook_embed",)
_KEY_INPUTS = ("hook_out", "final_ln.hook_normalized")  # encoder sites read (linearly) by every cross-attention


@dataclasses.dataclass
class AttributionResult:
    """Per config (axis 0): estimated effect of its patch on the metric (patched minus clean)."""

    sweep: Sweep
    method: str
    metric: str
    scores: np.ndarray                  # [K] signed estimate, mean over queries
    magnitudes: np.ndarray | None       # [K] AtP* GradDrop magnitude (atp* only)
    per_query: np.ndarray | None        # [K, N] signed estimates, when asked
    clean: np.ndarray                   # [N] the clean metric
    absolute: np.ndarray | None = None  # [K] |AtP|: mean over queries of |signed estimate| (no GradDrop)
    per_query_magnitudes: np.ndarray | None = None  # [K, N] GradDrop magnitudes per query (atp*, when asked)

    @property
    def ranking(self) -> np.ndarray:
        """What to rank units by: the GradDrop magnitude for atp*, |score| for atp."""
        return self.magnitudes if self.magnitudes is not None else np.abs(self.scores)


def mask_shape(config: T5Config, term: Term, batch: int, encoder_length: int, decoder_length: int = 1
                ) -> tuple[int, ...]:
    """The shape of a term's full mask for `batch` queries ([layers, B, ...] for layer sites): the shape of
    `gradient_step`'s ``zero_masks``."""
    layer = 0 if term.is_layer_site else None
    length = encoder_length if term.stack == "encoder" else decoder_length
    shape = (batch,) + site_shape(config, Site(term.stack, term.local, layer), length, encoder_length)
    return (num_layers(config, term.stack),) + shape if term.is_layer_site else shape


@functools.partial(jax.jit, static_argnames=("config", "plan", "metric", "drop", "partitioner", "dtype"))
def gradient_step(params, input_ids, attention_mask, targets, foils, values, zero_masks, zero_probes,
                  target_mask=None, *, config, plan, metric, drop, partitioner=None, dtype=None):
    """Attribution's gradient step (jitted), run per query chunk; ``plan``: `genir_jax.interp.patching.plan_terms`,
    ``zero_masks``: zeros of `mask_shape`. Returns (clean metric [B], gradient densities of the metric w.r.t.
    every term's mask [V, ...], and the probes' [V, ...]), V = 1 + (decoder layers when `drop`): variant 0 the plain gradient, variant 1 + l the gradient
    with decoder layer l's residual contributions blocked (GradDrop)."""
    with maybe_activate(partitioner):
        return _gradients_body(params, input_ids, attention_mask, targets, foils, values, zero_masks,
                               zero_probes, target_mask, config=config, plan=plan, metric=metric, drop=drop,
                               dtype=dtype)


def _gradients_body(params, input_ids, attention_mask, targets, foils, values, zero_masks, zero_probes,
                    target_mask=None, *, config, plan, metric, drop, dtype):
    """One forward pass, one backward pass for the plain gradient and, for GradDrop, one vmapped backward pass
    over the decoder layers. Blocking layer l's outputs (attn, cross-attn, MLP: each added straight to the
    residual) removes exactly the paths that leave through one of them; taking the last of them on each
    path, the blocked paths' gradient is the vector-Jacobian product of the three outputs (all upstream
    paths) with the gradient at the layer's output residual (the paths that bypass the later sub-layers).
    So GradDrop costs one backward pass per layer and no further forward pass."""
    last_stack = stacks(config)[-1]  # "decoder" (T5) or "blocks" (decoder-only): where GradDrop drops layers
    drop_sites = _BLOCK_DROP_SITES if is_decoder_only(config) else _DROP_SITES
    layers = num_layers(config, last_stack)
    length = input_ids.shape[1] if is_decoder_only(config) else decoder_inputs(config, input_ids, targets,
                                                                                 target_mask).shape[1]

    def run(masks, probes, gate):
        interventions: dict = {}

        def add(stack, local, patch):
            sites = interventions.setdefault(stack, {})
            sites[local] = tuple(sites.get(local, ())) + (patch,)

        for term, mask, value in sorted(zip(plan, masks, values), key=lambda z: z[0].order):
            add(term.stack, term.local, Patch(mask, value))
        for key, delta in probes.items():  # d/d delta = the gradient at the site (the QK fix reads them)
            stack, local = key.split(".", 1)
            add(stack, local, Shift(delta))
        if drop:  # the same probe on each layer's MLP output: the gradient at the layer's output residual
            add(last_stack, "hook_mlp_out", Shift(gate))
        hidden, outputs = _final_states(config, params, input_ids, attention_mask, targets, target_mask,
                                        interventions, drop_sites if drop else (), dtype)
        hidden = prediction_states(config, hidden, attention_mask)
        # streamed over vocabulary blocks: the logit metrics need no unembedding matmul at all
        per_query = final_metrics(config, params, hidden, targets, (metric,), None, foils, 0, target_mask)[metric]
        return per_query, outputs

    gate_shape = (layers, input_ids.shape[0], length, config.d_model) if drop else ()
    (clean, outputs), backward = jax.vjp(run, zero_masks, zero_probes, jnp.zeros(gate_shape, jnp.float32))
    no_outputs = jax.tree_util.tree_map(jnp.zeros_like, outputs)
    plain_masks, plain_probes, at_output = backward((jnp.ones_like(clean), no_outputs))
    plain = (plain_masks, plain_probes)
    if not drop:
        return clean, jax.tree_util.tree_map(lambda g: g[None], plain)

    def blocked(layer):
        only = (jnp.arange(layers) == layer).astype(at_output.dtype).reshape((layers,) + (1,) * (at_output.ndim - 1))
        through, through_probes, _ = backward((jnp.zeros_like(clean), (at_output * only,) * len(drop_sites)))
        return jax.tree_util.tree_map(jnp.subtract, plain, (through, through_probes))

    dropped = jax.vmap(blocked)(jnp.arange(layers))
    return clean, jax.tree_util.tree_map(lambda p, d: jnp.concatenate([p[None], d]), plain, dropped)


def _final_states(config, params, input_ids, attention_mask, targets, target_mask, interventions, drop_sites,
                  dtype):
    """The final-norm states [B, T, D] of one patched run and the outputs of `drop_sites` ([L, B, T, D] each) of
    the last stack: T5's decoder (after the encoder), or a decoder-only model's one stack, whose last layer's
    residual goes through the final norm alone (`decoder_only.forward_from_layer`) so no [B, T, V] logits are
    made."""
    if is_decoder_only(config):
        record = frozenset(drop_sites) | {"hook_resid_post"}
        _, raw, _ = decoder_only.DecoderOnly(config, record=record, dtype=dtype).apply(
            {"params": params}, input_ids, decoder_only.positions_from_mask(attention_mask), attention_mask,
            interventions)
        hidden = decoder_only.forward_from_layer(config, params, raw["hook_resid_post"][-1], config.num_layers,
                                                 attention_mask, interventions, dtype=dtype)
        return hidden, tuple(raw[local] for local in drop_sites)
    model = T5(config, decoder_cache=tuple((local, None) for local in drop_sites), dtype=dtype)
    start = decoder_inputs(config, input_ids, targets, target_mask)
    encoded, _ = model.apply({"params": params}, input_ids, attention_mask, interventions, method=T5.encode)
    hidden, cache = model.apply({"params": params}, encoded, attention_mask, start, None, interventions,
                                method=T5.decode)
    return hidden, tuple(cache[local] for local in drop_sites)


def _forward_with_cache(config, params, input_ids, attention_mask, start, cache_sites):
    """Logits and the recorded sites of a clean run of either family (`start`: T5's decoder inputs)."""
    if is_decoder_only(config):
        return decoder_only.forward_with_cache(config, params, input_ids, attention_mask, cache_sites=cache_sites)
    return t5_forward_with_cache(config, params, input_ids, attention_mask, start, cache_sites=cache_sites)


def _score_change(config, site: str, change, q, k, positions):
    """The change of attention scores [l, B, H, T, S] that a change of the queries (``hook_q``) or keys
    (``hook_k``) [l, B, T | S, heads, K] makes, the other being clean (`q`, `k`): scores are bilinear in them.
    T5: the plain dot product. Decoder-only models: queries and keys rotated (Llama / Qwen2; the sites are
    before the rotary embedding, which is linear), keys repeated over their group of query heads (grouped-query
    attention), the product scaled by ``d_kv ** -0.5``, as `genir_jax.core.decoder_modules.CausalSelfAttention`
    computes the scores."""
    queries, keys = (change, k) if site == "hook_q" else (q, change)
    if config is None or not is_decoder_only(config):
        return np.einsum("lbthk,lbshk->lbhts", queries, keys)
    if not config.is_gpt2:
        def rotated(x):
            return np.stack([np.asarray(rotate(jnp.asarray(layer, jnp.float32), positions, config.rope_theta),
                                        np.float64) for layer in x])
        queries, keys = rotated(queries), rotated(keys)
    keys = np.repeat(keys, config.num_heads // config.num_kv_heads, axis=3)
    return np.einsum("lbthk,lbshk->lbhts", queries, keys) * config.d_kv ** -0.5


def _term_scores(config: T5Config, term: Term, density: np.ndarray) -> np.ndarray:
    """Each config's estimate [V, K, B] from a term's density [V, (L,) B, *site]: sum under its mask."""
    layer_site = term.is_layer_site
    table = np.asarray(term.table, np.float32)  # [M, (L,) 1, *site-broadcast]
    count = len(term.row)
    out = np.zeros((density.shape[0], count, density.shape[2 if layer_site else 1]), np.float32)
    site_axes_start = 3 if layer_site else 2  # in [V, (L,) B, *site]
    unit_axis = None if term.unit is None else site_axes_start + term.unit_axis
    for r in range(table.shape[0]):
        users = np.flatnonzero(term.row == r)
        if users.size == 0:
            continue
        product = density * table[r][None]  # [V, (L,) B, *site]
        keep = {0, 1, 2} if layer_site else {0, 1}
        if unit_axis is not None:
            keep.add(unit_axis)
        reduced = product.sum(axis=tuple(a for a in range(product.ndim) if a not in keep), keepdims=False)
        # reduced: [V, (L,) B, (U)]
        for k in users:
            value = reduced
            if layer_site:
                value = value[:, term.layer[k]] if term.layer is not None else value.sum(axis=1)
            if unit_axis is not None:
                value = value[..., term.unit[k]]
            out[:, k] = value
    return out


def _encoder_qk_scores(config: T5Config, params, term: Term, cache: dict, encoded: np.ndarray, value,
                       attention_mask: np.ndarray, g_pattern: np.ndarray, g_v: np.ndarray) -> np.ndarray:
    """AtP* estimate [V, K, B] of a term patching ``encoder.hook_out``: exact cross-attention patterns with
    the patched keys (times the gradient at the pattern) plus the linear value path, every decoder layer."""
    cross = params["decoder"]["layers"]["cross_attn"]
    w_k, w_v = np.asarray(cross["key"], np.float32), np.asarray(cross["value"], np.float32)  # [L, D, H, Kd]
    q = np.asarray(cache["q"], np.float32)[:, :, 0]                   # [L, B, H, Kd]
    scores = np.asarray(cache["scores"], np.float32)[:, :, :, 0]      # [L, B, H, S]
    encoded, g_pattern, g_v = (np.asarray(a, np.float32) for a in (encoded, g_pattern, g_v))  # bf16 runs
    delta = np.broadcast_to(np.asarray(value, np.float32), encoded.shape) - encoded  # [B, S, D]
    dk = np.einsum("bsd,ldhk,lbhk->lbhs", delta, w_k, q)
    dv = np.einsum("bsd,ldhk->lbshk", delta, w_v)
    value_path = np.einsum("vlbshk,lbshk->vbs", g_v, dv)            # [V, B, S]
    valid = attention_mask.astype(bool)[None, :, None, :]
    clean_pattern = _softmax(scores, valid)
    table = np.asarray(term.table, np.float32)
    out = np.zeros((g_pattern.shape[0], len(term.row), encoded.shape[0]), np.float32)
    for k in np.flatnonzero(term.row >= 0):
        row = table[term.row[k]]  # [1, S or 1, D or 1]
        if row.shape[-1] != 1 and not np.all(row == row[..., :1]):
            raise InterventionError("atp*: an encoder.hook_out patch must select whole positions (the same "
                                    "mask for every d_model entry) for the QK fix")
        selection = np.broadcast_to(row[0, :, 0], (encoded.shape[1],)).astype(np.float32)
        if term.unit is not None:
            selection = selection * (np.arange(encoded.shape[1]) == term.unit[k])
        patched = _softmax(scores + dk * selection[None, None, None, :], valid)
        key_path = np.einsum("vlbhs,lbhs->vb", g_pattern, patched - clean_pattern)
        out[:, k] = key_path + np.einsum("vbs,s->vb", value_path, selection)
    return out


def _score_qk_scores(term: Term, cache: dict, value, g_pattern: np.ndarray, config=None, positions=None
                     ) -> np.ndarray:
    """AtP* estimate [V, K, B] of a term patching an attention layer's ``hook_q``, ``hook_k`` or
    ``hook_attn_scores`` (either stack, self- or cross-attention): per config, the patched scores of every
    layer it touches, the softmax evaluated exactly, times the gradient at the pattern (``g_pattern``
    [V, L, B, H, T, S]). Queries and keys reach the output only through the scores, so there is no other
    path to linearise. ``cache``: the clean q [L, B, T, H, K], k [L, B, S, H | KVH, K] and scores
    [L, B, H, T, S] (masked entries at the dtype's minimum, so the softmax keeps them at zero). `config`: the
    model (None: a T5), `positions` [B, T]: a decoder-only model's (for the rotary embedding, `_score_change`)."""
    site = term.local.rsplit(".", 1)[1]
    q, k, scores = (np.asarray(cache[name], np.float64) for name in ("q", "k", "scores"))
    x = {"hook_q": q, "hook_k": k, "hook_attn_scores": scores}[site]
    delta = np.broadcast_to(np.asarray(value, np.float64), x.shape) - x           # [L, B, *site]
    clean_pattern = _softmax(scores, True)
    g_pattern = np.asarray(g_pattern, np.float64)
    table = np.asarray(term.table, np.float64)                                     # [M, (L,) 1, *site]
    unit_axis = None if term.unit is None else 2 + term.unit_axis                  # in [L, B, *site]
    out = np.zeros((g_pattern.shape[0], len(term.row), x.shape[1]), np.float32)
    for c in np.flatnonzero(term.row >= 0):
        at = slice(None) if term.layer is None else slice(term.layer[c], term.layer[c] + 1)  # layers it patches
        mask = np.broadcast_to(table[term.row[c]], x.shape)[at]
        if unit_axis is not None:
            keep = (np.arange(x.shape[unit_axis]) == term.unit[c]).reshape(
                (-1,) + (1,) * (x.ndim - unit_axis - 1))
            mask = mask * keep
        change = mask * delta[at]
        if site in ("hook_q", "hook_k"):
            change = _score_change(config, site, change, q[at], k[at], positions)
        patched = _softmax(scores[at] + change, True)
        out[:, c] = np.einsum("vlbhts,lbhts->vb", g_pattern[:, at], patched - clean_pattern[at])
    return out


def _softmax(scores: np.ndarray, valid) -> np.ndarray:
    scores = np.where(valid, scores.astype(np.float64), -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(axis=-1, keepdims=True)


def attribute(config: T5Config, params, input_ids, attention_mask, target_ids, sweep, *, method: str = "atp",
              metric: str = "logit", foil_ids=None, source: Source | None = None, query_chunk: int | None = None,
              progress: bool = True, per_query: bool = False, partitioner: Partitioner | None = None,
              dtype=None, target_mask=None) -> AttributionResult:
    """Estimate, for every config of `sweep`, the change of `metric` its patch causes (see module docstring).

    `metric`: one of `DIFFERENTIABLE_METRICS` (ranks and Hits@k are not differentiable); `foil_ids` [N] for
    ``logit_diff``; `source` for `FROM_SOURCE` values; `query_chunk` queries per backward pass (default 32).
    `partitioner` (`genir_jax.scale.partitioning.Partitioner`): parameters placed by its rules, queries split over
    ``data`` (default: `genir_jax.scale.partitioning.current()`, else as the arrays lie). `dtype` (e.g.
    ``"bfloat16"``): parameters stored and the model computed in it; metrics and estimates stay float32.
    Multi-token docids: target_ids [N, T] with `target_mask` [N, T], as `genir_jax.interp.patching.run_sweep` takes
    them (teacher-forced decoder runs, every decoder position patched); the metric is ``logprob`` (the
    sequence's); AtP*'s QK fix of ``encoder.hook_out`` is single-step only and refused there.
    """
    if method not in METHODS:
        raise InterventionError(f"attribution method '{method}' is not one of {', '.join(METHODS)}")
    if metric not in DIFFERENTIABLE_METRICS:
        raise InterventionError(f"metric '{metric}' cannot be attributed by {method}: it is not differentiable; "
                                f"use one of {', '.join(DIFFERENTIABLE_METRICS)}")
    sweep = as_sweep(sweep)
    if sweep.receivers is not None:
        raise InterventionError("attribution of path-patching sweeps is not supported; run them exactly")
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = np.asarray(attention_mask, np.int32)
    target_ids = np.asarray(target_ids, np.int32)
    count, length = input_ids.shape
    if count == 0:
        raise InterventionError("attribution: no queries given")
    if target_mask is not None:
        target_mask = check_sequences(target_ids, target_mask, count, [metric], what="attribution")
    elif target_ids.shape != (count,):
        raise InterventionError(f"attribution: target_ids must have shape ({count},), got {target_ids.shape}")
    check_token_ids("target", target_ids, config.vocab_size)
    if is_decoder_only(config):
        check_decoder_only_sweep(sweep, source, target_mask, "attribution")
        decoder_length = length  # the prompt, as run_sweep patches it
    else:
        decoder_length = 1 if target_mask is None else target_ids.shape[1]
    if "foils" in METRIC_TABLE[metric].needs:
        if foil_ids is None:
            raise InterventionError(f"attribution: metric '{metric}' needs a foil token per query (`foil_ids`)")
        foil_ids = np.asarray(foil_ids, np.int32).reshape(-1)
        check_token_ids("foil", foil_ids, config.vocab_size)
        if foil_ids.shape != (count,) or np.any(foil_ids == target_ids):
            raise InterventionError("attribution: foil_ids must have one token per query, none equal to its target")
    validate_terms(config, sweep, length, decoder_length)
    dtype = None if dtype is None else jnp.dtype(dtype)
    if dtype is not None:
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
        if source is not None:
            source = source._replace(params=jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), source.params))
    partitioner = partitioner if partitioner is not None else current()
    if partitioner is not None:
        params = partitioner.shard_params(params, logical_axes(config))
        if source is not None:
            source = source._replace(params=partitioner.shard_params(source.params, logical_axes(source.config)))
    place = (lambda a: put_rows(a, partitioner)) if partitioner is not None else jnp.asarray
    plan = plan_terms(sweep.terms)
    names = source_site_names(config, plan)
    if names and source is None:
        raise InterventionError("attribution: FROM_SOURCE values need a `source`")
    star = method == "atp*"
    if star:
        _refuse_unfixed(config, sweep.terms)
    qk_terms = [i for i, t in enumerate(sweep.terms) if star and t.stack == "encoder" and t.local in _KEY_INPUTS]
    if qk_terms and target_mask is not None:
        raise InterventionError("atp*: the QK fix of encoder.hook_out (and encoder_final_ln.hook_normalized) patches "
                                "is implemented for single-token docids only; use atp (or an exact sweep) for docid "
                                "sequences")
    score_terms = {i: t.local.rsplit(".", 1)[0] for i, t in enumerate(sweep.terms)
                   if star and t.local in _QK_LOCALS}  # term -> its attention ("attn" or "cross_attn")
    attentions = sorted({(sweep.terms[i].stack, prefix) for i, prefix in score_terms.items()})
    layers = num_layers(config, stacks(config)[-1])
    variants = 1 + (layers if star else 0)  # the plain gradient, then one per dropped layer (GradDrop)
    chunk = query_chunk or min(count, 32)
    # a clean forward pass first only for the QK fix, which recomputes attention patterns from it
    cache_sites = []
    if qk_terms:
        cache_sites = [site_name("decoder", f"cross_attn.{site}", ALL_LAYERS)
                       for site in ("hook_q", "hook_attn_scores", "hook_pattern", "hook_v")]
        cache_sites += [site_name("encoder", "hook_out"), site_name("encoder", "final_ln.hook_normalized")]
    cache_sites += [site_name(stack, f"{prefix}.{site}", ALL_LAYERS) for stack, prefix in attentions
                    for site in ("hook_q", "hook_k", "hook_attn_scores", "hook_pattern")]
    cache_sites = list(dict.fromkeys(cache_sites))
    scores = np.zeros((variants, sweep.size, count), np.float32)
    clean = np.zeros(count, np.float32)
    foils_all = foil_ids if foil_ids is not None else np.zeros(count, np.int32)
    source_ids = np.asarray(source.input_ids if source is not None and source.input_ids is not None else input_ids,
                            np.int32)
    source_mask = np.asarray(source.attention_mask if source is not None and source.attention_mask is not None
                             else (attention_mask if source is None or source.input_ids is None
                                   else np.ones_like(source_ids)), np.int32)
    mask_all = target_mask if target_mask is not None else np.zeros(count, np.int32)
    steps = list(batches((input_ids, attention_mask, target_ids, foils_all, source_ids, source_mask, mask_all), chunk))
    for batch in compiling_bar(steps, desc=f"attribution ({method})", unit="chunk", disable=not progress):
        ids, mask, targets, foils, s_ids, s_mask, tmask = batch.arrays
        tmask = tmask if target_mask is not None else None
        start = None if is_decoder_only(config) else np.asarray(decoder_inputs(config, ids, targets, tmask))
        cache = {}
        if cache_sites:
            with maybe_activate(partitioner):  # forward keys its program by the rules it runs under
                _, cache = _forward_with_cache(config, params, place(ids), place(mask),
                                               None if start is None else place(start), cache_sites)
        source_values = {}
        if names:
            with maybe_activate(partitioner):
                _, source_cache = t5_forward_with_cache(source.config, source.params, place(s_ids), place(s_mask),
                                                     place(start), cache_sites=names)
            for term in plan:
                if term.from_source:
                    if term.layer_site:
                        source_values[(term.stack, term.local)] = jnp.stack(
                            [source_cache[site_name(term.stack, term.local, l)]
                             for l in range(num_layers(config, term.stack))])
                    else:
                        source_values[(term.stack, term.local)] = source_cache[Site(term.stack, term.local, None).name]
        values = tuple(source_values[(t.stack, t.local)] if isinstance(t.value, FromSource) else jnp.asarray(t.value)
                       for t in sweep.terms)
        zero_masks = tuple(jnp.zeros(mask_shape(config, t, chunk, length, decoder_length), jnp.float32)
                           for t in sweep.terms)

        def stacked(local, stack="decoder"):
            return jnp.stack([cache[site_name(stack, local, l)] for l in range(num_layers(config, stack))])

        probe_sites = ([("decoder", "cross_attn.hook_pattern"), ("decoder", "cross_attn.hook_v")] if qk_terms else [])
        probe_sites += [(stack, f"{prefix}.hook_pattern") for stack, prefix in attentions]
        zero_probes = {f"{stack}.{local}": jnp.zeros(stacked(local, stack).shape, jnp.float32)
                       for stack, local in dict.fromkeys(probe_sites)}
        clean_metric, (term_grads, probe_grads) = gradient_step(
            params, place(ids), place(mask), place(targets), place(foils) if foil_ids is not None else None, values,
            zero_masks, zero_probes, None if tmask is None else place(tmask), config=config, plan=plan,
            metric=metric, drop=star, partitioner=partitioner, dtype=dtype)
        rows = batch.rows
        clean[rows] = np.asarray(clean_metric)[: batch.size]
        if qk_terms:
            qk_cache = {"q": stacked("cross_attn.hook_q"), "scores": stacked("cross_attn.hook_attn_scores")}
        for i, term in enumerate(sweep.terms):
            if i in qk_terms:
                encoded, value = np.asarray(cache["encoder.hook_out"], np.float32), np.asarray(values[i], np.float32)
                if term.local == "final_ln.hook_normalized":  # hook_out = normalized * scale: the same patch there
                    scale = np.asarray(params["encoder"]["final_norm"]["scale"], np.float32)
                    value = encoded + (value - np.asarray(cache["encoder_final_ln.hook_normalized"], np.float32)) * scale
                estimate = _encoder_qk_scores(
                    config, params, term, qk_cache, encoded, value,
                    mask, np.asarray(probe_grads["decoder.cross_attn.hook_pattern"])[:, :, :, :, 0],
                    np.asarray(probe_grads["decoder.cross_attn.hook_v"]))
            elif i in score_terms:
                prefix = score_terms[i]
                estimate = _score_qk_scores(
                    term, {name: stacked(f"{prefix}.hook_{site}", term.stack)
                           for name, site in (("q", "q"), ("k", "k"), ("scores", "attn_scores"))},
                    np.asarray(values[i]), np.asarray(probe_grads[f"{term.stack}.{prefix}.hook_pattern"]), config,
                    np.asarray(decoder_only.positions_from_mask(mask)) if is_decoder_only(config) else None)
            else:
                estimate = _term_scores(config, term, np.asarray(term_grads[i]))
            scores[:, :, rows] += estimate[:, :, : batch.size]
    signed = scores[0]
    magnitudes = per_query_magnitudes = None
    if star:  # per query pair: sum_l |estimate with layer l dropped| / (layers whose drop can reach it)
        divisor = np.maximum(1, layers - _own_layer_counts(config, sweep)).astype(np.float32)
        per_query_magnitudes = np.abs(scores[1:]).sum(axis=0) / divisor[:, None]
        magnitudes = per_query_magnitudes.mean(axis=1)
    return AttributionResult(sweep=sweep, method=method, metric=metric, scores=signed.mean(axis=1),
                             magnitudes=magnitudes, per_query=signed if per_query else None, clean=clean,
                             absolute=np.abs(signed).mean(axis=1),
                             per_query_magnitudes=per_query_magnitudes if per_query else None)


def _own_layer_counts(config, sweep: Sweep) -> np.ndarray:
    """Per config: 1 when it sits inside one layer's attention, cross-attention or MLP of the last stack (T5's
    decoder, a decoder-only model's blocks; dropping that layer's outputs blocks every path out of it, so that
    GradDrop variant is zero by construction), else 0."""
    own = np.zeros(sweep.size, np.int64)
    for term in sweep.terms:
        if term.stack != stacks(config)[-1] or not term.is_layer_site or term.local in _RESIDUAL_LOCALS:
            continue
        users = np.flatnonzero(term.row >= 0)
        if term.layer is not None:
            users = users[np.asarray(term.layer)[users] >= 0]
            own[users] = 1
    return own


def _refuse_unfixed(config, terms) -> None:
    """atp*: refuse the sites whose patches change attention keys or queries downstream through a norm, where
    no QK fix is implemented yet (never plain AtP under the atp* name): T5's encoder residual stream and
    embeddings, a decoder-only model's residual stream (every later self-attention reads it at every
    position)."""
    for term in terms:
        if term.stack == "encoder" and (term.local in _RESIDUAL_LOCALS or term.local in _UNFIXED_STACK_LOCALS):
            where = site_name("encoder", term.local, ALL_LAYERS if term.is_layer_site else None)
            raise InterventionError(
                f"atp*: AtP* has no QK fix for {where} patches yet (they change every later attention's queries "
                f"and keys and the cross-attention keys through a norm); use --method atp (plain AtP) or exact")
        if is_decoder_only(config) and term.local in _RESIDUAL_LOCALS:
            where = site_name(term.stack, term.local, ALL_LAYERS)
            raise InterventionError(
                f"atp*: AtP* has no QK fix for {where} patches yet (every later self-attention reads them as "
                f"queries and keys through a norm); use --method atp (plain AtP) or exact")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2:
        raise ValueError("spearman: need at least two values")
    return float(spearman_rows(a, b))


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis, row by row (e.g. one row per bootstrap resample): the
    Pearson correlation of average ranks (ties share their mean rank); 0 for a constant row."""
    from scipy.stats import rankdata

    ra = rankdata(np.asarray(a, np.float64), axis=-1)
    rb = rankdata(np.asarray(b, np.float64), axis=-1)
    ra, rb = ra - ra.mean(axis=-1, keepdims=True), rb - rb.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((ra ** 2).sum(axis=-1) * (rb ** 2).sum(axis=-1))
    numerator = (ra * rb).sum(axis=-1)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def top_overlap(reference: np.ndarray, estimate: np.ndarray, k: int) -> float:
    """Share of the reference's top-k (by value) that the estimate also puts in its top-k."""
    return float(top_overlap_rows(np.asarray(reference), np.asarray(estimate), k))


def top_overlap_rows(reference: np.ndarray, estimate: np.ndarray, k: int) -> np.ndarray:
    """`top_overlap` along the last axis, row by row (ties: the lower index first, in both)."""
    reference, estimate = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
    k = min(k, reference.shape[-1])
    top_ref = np.argsort(-reference, axis=-1, kind="stable")[..., :k]
    top_est = np.argsort(-estimate, axis=-1, kind="stable")[..., :k]
    chosen = np.zeros(reference.shape, bool)
    np.put_along_axis(chosen, top_ref, True, axis=-1)
    return np.take_along_axis(chosen, top_est, axis=-1).sum(axis=-1) / k


# --------------------------------------------------------------------------------------------------
# Agreement with exact patching
# --------------------------------------------------------------------------------------------------

CHECK_TOP = 20             # units re-run exactly by `check_against_exact` (the top by `ranking`)
MIN_SIGN_AGREEMENT = 0.8   # below: the estimate's signs are not to be trusted (warned)
MIN_SPEARMAN = 0.5         # below: its order is not to be trusted (warned)


def sign_agreement(estimate: Sequence[float], exact: Sequence[float]) -> float:
    """Share of configs whose estimate has the exact effect's sign (0 counts as its own sign)."""
    estimate, exact = np.asarray(estimate, np.float64), np.asarray(exact, np.float64)
    if estimate.shape != exact.shape or estimate.size == 0:
        raise ValueError(f"sign_agreement: need two equally long non-empty vectors, got {estimate.shape} and "
                         f"{exact.shape}")
    return float(np.mean(np.sign(estimate) == np.sign(exact)))


@dataclasses.dataclass(frozen=True)
class Agreement:
    """Attribution estimates beside the exact effects of the same configs (a sample: the top units)."""

    method: str
    metric: str
    configs: np.ndarray    # [n] indices into the attribution's sweep
    estimate: np.ndarray   # [n] the attribution's signed scores
    exact: np.ndarray      # [n] the exact mean effects (patched - clean)

    @property
    def spearman(self) -> float | None:
        """Spearman rank correlation of estimate and exact effect (None for fewer than two configs)."""
        return spearman(self.estimate, self.exact) if len(self.configs) >= 2 else None

    @property
    def sign_agreement(self) -> float:
        return sign_agreement(self.estimate, self.exact)

    @property
    def warning(self) -> str | None:
        """One line when the estimate disagrees with exact patching (signs or order), else None."""
        rho = self.spearman
        if self.sign_agreement >= MIN_SIGN_AGREEMENT and (rho is None or rho >= MIN_SPEARMAN):
            return None
        return (f"{self.method} disagrees with exact patching on its top {len(self.configs)} units: "
                f"{self.describe()} (trust its scores below {MIN_SIGN_AGREEMENT:.0%} sign agreement or Spearman "
                f"{MIN_SPEARMAN} only after exact patching)")

    def describe(self) -> str:
        rho = self.spearman
        return (f"Spearman {'n/a' if rho is None else f'{rho:.2f}'}, same sign {self.sign_agreement:.0%} "
                f"(n={len(self.configs)})")

    def as_dict(self, sweep: Sweep | None = None) -> dict:
        """JSON-ready: the statistics, the thresholds and per config its labels, estimate and exact effect."""
        return {"method": self.method, "metric": self.metric, "configs": len(self.configs),
                "spearman": self.spearman, "sign_agreement": self.sign_agreement,
                "thresholds": {"sign_agreement": MIN_SIGN_AGREEMENT, "spearman": MIN_SPEARMAN},
                "warning": self.warning,
                "units": [{**({} if sweep is None else sweep.label(int(k))), "config": int(k),
                           "estimate": float(e), "exact": float(x)}
                          for k, e, x in zip(self.configs, self.estimate, self.exact)]}


def check_against_exact(config: T5Config, params, input_ids, attention_mask, target_ids, result: AttributionResult,
                        *, top: int = CHECK_TOP, foil_ids=None, source: Source | None = None, target_mask=None,
                        query_chunk: int | None = None, partitioner: Partitioner | None = None, dtype=None,
                        progress: bool = True) -> Agreement:
    """Re-run the `top` units of an attribution (by its `ranking`) with exact patching
    (`genir_jax.interp.patching.run_sweep`, the same queries, values and metric) and set the estimates beside
    the exact mean effects. AtP can get signs wrong (e.g. saturated attention): this says where it does."""
    from genir_jax.interp.patching import run_sweep

    if top < 1:
        raise ValueError(f"check_against_exact: top must be >= 1, got {top}")
    configs = np.argsort(-np.asarray(result.ranking, np.float64), kind="stable")[:top]
    exact = run_sweep(config, params, input_ids, attention_mask, target_ids, result.sweep.take(configs),
                      source=source, metrics=(result.metric,), foil_ids=foil_ids, top_k=0, hits=(),
                      target_mask=target_mask, query_chunk=query_chunk, partitioner=partitioner, dtype=dtype,
                      per_query=False, progress=progress, desc=f"exact check of the top {len(configs)}")
    return Agreement(result.method, result.metric, configs, np.asarray(result.scores, np.float64)[configs],
                     np.asarray(exact.aggregates[f"{result.metric}_effect"], np.float64))
