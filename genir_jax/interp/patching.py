"""The sweep engine: K intervention configs x N queries, one `jax.vmap` over configs inside one `jax.jit`.

`run_sweep` takes a `genir_jax.interp.sweep.Sweep` (or, as before, one `Interventions` whose masks carry a
leading config axis) and returns, per config and query, the metrics asked for (`METRICS`): the 0-based
rank of the target in the full vocabulary (the reference's ``argsort(argsort(-logits))`` position; ties
broken by token id, lower first), its rank among the docid tokens, its logit, its log-probability and its
logit difference to a foil; plus per-config aggregates (means, effects, Hits@k, fractions beyond ranks).

How the work is shared:
- per query chunk, one clean run computes the encoder output, the residual stream entering every decoder
  layer and the source run's activations (`FROM_SOURCE` values: the pretrained T5 on the same query, the
  same model on resampled queries, another model's encoder). It is computed once and reused by every
  config chunk;
- prefix sharing: configs are grouped by the first decoder layer they touch; a group starting at layer l
  runs only layers l..L-1 from the clean residual entering l (`genir_jax.core.model.decode_suffix`), and the
  encoder's cross-attention keys/values do not depend on the config, so they stay unbatched;
- configs that patch the encoder output (``encoder.hook_out``) patch the shared output; configs that
  patch inside the encoder run it per config;
- the dense masks of a config chunk are built inside the compiled function from a few integers per
  config (`genir_jax.interp.sweep.Term`), so a 98,304-config neuron sweep never materialises its masks;
- placement is a `genir_jax.scale.partitioning.Partitioner`: queries split over its ``data`` axis, configs over
  ``configs``, parameters as its rules say (``model``); by default every local device is on ``data``.
  Configs and queries are chunked, so peak memory is set by
  the chunk sizes, not by K, beyond the host's per-config tables and results (K is at most
  `genir_jax.interp.sweep.MAX_CONFIGS`). With ``per_query=False`` only per-config aggregates are kept on the host.
- full-vocabulary ranks compute few logits: a config's final state differs little from the clean one,
  which bounds how far every token's logit can move, so each row computes only the logits of the
  `RANK_WINDOW` tokens around its target and ranks over the whole vocabulary only the rows the bound
  cannot decide (`genir_jax.interp.rank_window`; ``rank_window=0`` turns it off);
- a `store` (see `genir_jax.interp.sweep_store`) makes a long sweep resumable by chunk.

Decoder-only models (a `genir_jax.core.decoder_config.DecoderConfig`, sites ``blocks.*``) run through the same
engine: a query is a prompt (left- or right-padded) whose next token is an atomic docid, predicted at its
last real token (`prediction_states`); the clean run is one forward over the prompt, and a config group
starting at layer l runs `genir_jax.core.decoder_only.forward_from_layer` from the clean residual entering l.
The few family differences sit in the dispatch functions below (`unembedding_rows`, `logical_axes`,
`prediction_states`, the clean run, the source run and the suffix). `FROM_SOURCE` values come from a source
run of the `Source` model on its prompts (default: the queries' own), which must be padded to the queries'
length: a patched site takes the source's activation at the same position (resampling: `resample_source`).
Path patching (receivers) runs as for T5 over ``blocks.{l}`` attn / mlp inputs and the final residual
(`genir_jax.core.decoder_only.forward_from_layer` with ``receivers``). Not supported there yet, refused with an
`InterventionError`: multi-token targets and ``hook_embed`` patches.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from genir_jax.base.progress import compiling_bar

from genir_jax.base.batching import batches, pad_rows
from genir_jax.base.program_cache import cached_jit
from genir_jax.core.config import T5Config
from genir_jax.interp.interventions import FROM_SOURCE, FromSource, InterventionError, validate  # noqa: F401 (re-export)
from genir_jax.interp.metrics import (  # noqa: F401 (re-exported: the sweep's metrics)
    DIFFERENTIABLE_METRICS, METRIC_TABLE, METRICS, RANK_METRICS, STEP_REDUCTIONS, THRESHOLDS, block_aggregates,
    ranks_of_targets, reduce_steps, VOCAB_BLOCK, streamed_target_metrics, target_metrics,
)
from genir_jax.core import decoder_only, model as t5_model
from genir_jax.core.model import T5, cache_specs, decode_suffix
from genir_jax.scale.partitioning import Partitioner, current, fetch, maybe_activate
from genir_jax.interp.rank_window import RANK_WINDOW, clean_window, windowed_ranks
from genir_jax.core.sites import (
    BLOCKS, STACK_SITES, Site, components as layer_components, is_decoder_only, num_layers, parse_site, site_name,
    site_shape, stacks,
)
from genir_jax.interp.sweep import Sweep, Term, as_sweep, first_decoder_layer
from genir_jax.core.taps import Patch, apply_patch



class Source(NamedTuple):
    """The run that supplies `FROM_SOURCE` values: a model (same architecture) and, optionally, its own
    inputs aligned with the swept queries (e.g. a resampled query per row, or another tokenisation)."""

    config: T5Config
    params: Any
    input_ids: Any = None
    attention_mask: Any = None


@dataclasses.dataclass
class SweepResult:
    """Results of a sweep: per-config aggregates always, per-query values when asked (the default).

    ``values[m]`` is [K, N] for metric m, ``clean[m]`` [N] (the unpatched model), ``aggregates`` maps
    column names (see `summary_columns`) to [K] arrays. ``top_ids`` / ``top_logits`` [K, N, k] when a
    top-k was asked (indices into `candidates` when given).
    """

    sweep: Sweep
    metrics: tuple[str, ...]
    clean: dict[str, np.ndarray]
    aggregates: dict[str, np.ndarray]
    values: dict[str, np.ndarray] | None = None
    top_ids: np.ndarray | None = None
    top_logits: np.ndarray | None = None
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def ranks(self) -> np.ndarray:
        return self.values["rank"]

    @property
    def target_logits(self) -> np.ndarray:
        return self.values["logit"]

    def summary(self) -> list[dict]:
        """One row per config: its labels, then every aggregate column."""
        rows = self.sweep.label_table()
        for k, row in enumerate(rows):
            for name, column in self.aggregates.items():
                row[name] = float(column[k])
        return rows


# --------------------------------------------------------------------------------------------------
# Compiled pieces
# --------------------------------------------------------------------------------------------------

class TermPlan(NamedTuple):
    """What the compiled step needs to know about a sweep term statically (hashable: a jit static argument)."""

    stack: str
    local: str
    layer_site: bool
    has_layer: bool
    unit_axis: int | None
    unit_size: int
    from_source: bool
    order: int


def plan_terms(terms: Sequence[Term]) -> tuple[TermPlan, ...]:
    """The plan of a sweep's terms: the static ``plan`` argument of `config_chunk_step` (and of attribution's
    gradient step)."""
    return tuple(TermPlan(t.stack, t.local, t.is_layer_site, t.layer is not None, t.unit_axis if t.unit is not None
                           else None, t.unit_size, isinstance(t.value, FromSource), t.order) for t in terms)


def source_site_names(config: T5Config, plan: Sequence[TermPlan]) -> list[str]:
    """The full names of the sites whose `FROM_SOURCE` values the planned terms read from the source run."""
    names = []
    for term in plan:
        if not term.from_source:
            continue
        if not term.layer_site:
            names.append(Site(term.stack, term.local, None).name)
        else:
            names += [site_name(term.stack, term.local, layer) for layer in range(num_layers(config, term.stack))]
    return sorted(set(names))


def _build_interventions(config: T5Config, plan, tables, values, source_values, index) -> dict:
    """One config's interventions from its per-term (row, layer, unit) integers (inside vmap)."""
    out: dict = {}
    for term, table, value, (row, layer, unit) in sorted(zip(plan, tables, values, index), key=lambda z: z[0].order):
        mask = table[row]
        if term.has_layer:
            count = num_layers(config, term.stack)
            onehot = (jnp.arange(count) == layer).astype(mask.dtype)
            mask = mask * onehot.reshape((count,) + (1,) * (mask.ndim - 1))
        if term.unit_axis is not None:
            axis = term.unit_axis + (2 if term.layer_site else 1)
            shape = [1] * mask.ndim
            shape[axis] = term.unit_size
            mask = mask * (jnp.arange(term.unit_size) == unit).astype(mask.dtype).reshape(shape)
        if term.from_source:
            value = source_values[(term.stack, term.local)]
        sites = out.setdefault(term.stack, {})
        sites[term.local] = tuple(sites.get(term.local, ())) + (Patch(mask, value),)
    return out


# --------------------------------------------------------------------------------------------------
# Family dispatch: the few places where T5 and decoder-only models differ
# --------------------------------------------------------------------------------------------------

def unembedding_rows(config, params):
    """The unembedding (table [V, D], scale) of the config's family (T5 or decoder-only)."""
    family = decoder_only if is_decoder_only(config) else t5_model
    return family.unembedding_rows(config, params)


def logical_axes(config):
    """The parameters' logical axis names of the config's family (T5 or decoder-only)."""
    family = decoder_only if is_decoder_only(config) else t5_model
    return family.logical_axes(config)


def prediction_states(config, hidden, attention_mask):
    """The final states that predict the targets: T5's decoder states as they are (position 0 predicts an
    atomic docid, teacher-forced steps the others); for a decoder-only model [B, 1, D], the state at each
    prompt's last real token (`genir_jax.core.decoder_only.last_positions`), whose next token is the docid."""
    if not is_decoder_only(config):
        return hidden
    last = decoder_only.last_positions(attention_mask)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)


def _clean_run(config, params, input_ids, attention_mask, targets, target_mask):
    """The clean run of a query chunk: (final states [B, T, D], residual stream entering each layer of the
    last stack and leaving its last layer [L+1, B, T, D], the encoder output or None). Decoder-only models
    run the prompt once (their logits are never used, so XLA drops the unembedding)."""
    if is_decoder_only(config):
        record = frozenset({"hook_resid_pre", "hook_resid_post"})
        _, raw, _ = decoder_only.DecoderOnly(config, record=record).apply(
            {"params": params}, input_ids, decoder_only.positions_from_mask(attention_mask), attention_mask)
        states = jnp.concatenate([raw["hook_resid_pre"], raw["hook_resid_post"][-1:]], axis=0)
        return _suffix(config, params, states[-1], config.num_layers, None, attention_mask, None, None), states, None
    model = T5(config, decoder_cache=(("hook_embed", None), ("hook_resid_post", None)))
    variables = {"params": params}
    inputs = decoder_inputs(config, input_ids, targets, target_mask)
    encoded, _ = model.apply(variables, input_ids, attention_mask, method=T5.encode)
    hidden, cache = model.apply(variables, encoded, attention_mask, inputs, None, None, method=T5.decode)
    states = jnp.concatenate([cache["hook_embed"][None], cache["hook_resid_post"]], axis=0)  # [L+1, B, T, D]
    return hidden, states, encoded


def _suffix(config, params, x, start, encoded, attention_mask, interventions, receivers):
    """The last stack from the residual stream `x` entering layer `start` to its final-norm output (prefix
    sharing): T5's `decode_suffix` (reading `encoded`) or `genir_jax.core.decoder_only.forward_from_layer`."""
    if is_decoder_only(config):
        return decoder_only.forward_from_layer(config, params, x, start, attention_mask, interventions,
                                               receivers=receivers)
    return decode_suffix(config, params, x, start, encoded, attention_mask, (interventions or {}).get("decoder"),
                         receivers=receivers)


def final_metrics(config, params, hidden, targets, metrics, candidates, foils, top_k, target_mask=None):
    """The metrics of the final decoder states [B, T, D], streamed over vocabulary blocks (clean run and
    configs alike, so effects compare like with like): of the one step (single-token targets [B]), or of
    every step of teacher-forced target sequences [B, T] reduced per query (`STEP_REDUCTIONS`)."""
    table, scale = unembedding_rows(config, params)
    if target_mask is None:
        return streamed_target_metrics(hidden[:, 0] * scale, table, targets, metrics, candidates=candidates,
                                       foils=foils, top_k=top_k)
    rows, steps = targets.shape
    per_step = streamed_target_metrics(hidden.reshape(rows * steps, -1) * scale, table, targets.reshape(-1), metrics)
    return {m: reduce_steps(m, per_step[m].reshape(rows, steps), target_mask) for m in metrics}


def decoder_inputs(config, input_ids, targets, target_mask):
    """The decoder's inputs: the start token (single-token targets) or the teacher-forced sequence."""
    start = jnp.full((input_ids.shape[0], 1), config.decoder_start_token_id, dtype=jnp.int32)
    if target_mask is None:
        return start
    return jnp.concatenate([start, targets[:, :-1]], axis=1)


@cached_jit(static_argnames=("config", "source_config", "source_spec", "metrics", "top_k", "window",
                             "partitioner"))
def clean_state(params, source_params, input_ids, attention_mask, source_ids, source_mask, targets, foils,
                 candidates, target_mask=None, *, config, source_config, source_spec, metrics, top_k, window=0,
                 partitioner=None):
    """The sweep's clean-state step (jitted), run once per query chunk: ``(state, clean metrics)``, where
    ``state`` (encoder output, residual entering each decoder layer, source activations, rank window) is what
    every `config_chunk_step` of that chunk reads. ``source_spec``: `genir_jax.core.model.cache_specs` of the
    source sites (None without a source)."""
    with maybe_activate(partitioner):
        return _clean_state_body(params, source_params, input_ids, attention_mask, source_ids, source_mask, targets,
                                 foils, candidates, target_mask, config=config, source_config=source_config,
                                 source_spec=source_spec, metrics=metrics, top_k=top_k, window=window)


def _clean_state_body(params, source_params, input_ids, attention_mask, source_ids, source_mask, targets, foils,
                      candidates, target_mask=None, *, config, source_config, source_spec, metrics, top_k, window=0):
    """Per query chunk: encoder output, residual entering each decoder layer (and the last one's output),
    source activations, the clean metrics and, with `window` > 0, the rank window (`clean_window`). With
    target sequences every decoder run (the source's too) reads the query's teacher-forced docid."""
    hidden, states, encoded = _clean_run(config, params, input_ids, attention_mask, targets, target_mask)
    hidden = prediction_states(config, hidden, attention_mask)
    clean = final_metrics(config, params, hidden, targets, metrics, candidates, foils, top_k, target_mask)
    source_values = {}
    if source_spec is not None and is_decoder_only(config):
        # the source prompts (same padded length): the recorded sites, layer sites stacked [L, B, ...]
        _, raw, _ = decoder_only.DecoderOnly(source_config, record=source_spec).apply(
            {"params": source_params}, source_ids, decoder_only.positions_from_mask(source_mask), source_mask)
        source_values = {(BLOCKS, local): array for local, array in raw.items()}
    elif source_spec is not None:
        source = T5(source_config, encoder_cache=source_spec[0], decoder_cache=source_spec[1])
        source_start = decoder_inputs(source_config, source_ids, targets, target_mask)
        _, raw = source.apply({"params": source_params}, source_ids, source_mask, source_start)
        source_values = {(stack, local): array for stack, sites in raw.items() for local, array in sites.items()}
    state = {"encoded": encoded, "states": states, "source": source_values}
    if window:
        table, scale = unembedding_rows(config, params)
        state["window"] = clean_window(hidden[:, 0] * scale, table, targets, window)
    return state, clean


@cached_jit(static_argnames=("config", "plan", "encoder_kind", "paths", "metrics", "top_k", "partitioner"))
def config_chunk_step(params, state, input_ids, attention_mask, targets, foils, candidates, tables, values, index,
                 receivers, start, target_mask=None, *, config, plan, encoder_kind, paths, metrics, top_k,
                 partitioner=None):
    """The sweep's per-chunk step (jitted): metrics [Kc, B] of a chunk of configs (vmapped) on a chunk of
    queries, from the query chunk's `clean_state`. ``plan``: `plan_terms`; ``tables`` / ``values`` / ``index``:
    the terms' mask tables, values and each config's (row, layer, unit) integers; ``start``: the first decoder
    layer the chunk's configs touch; ``encoder_kind`` 2: they patch inside the encoder (run per config). With a rank window in `state`,
    ``rank`` comes from `windowed_ranks` over all the chunk's rows at once (``decided`` [Kc, B]: the rows its
    bound decided; ``full_rows``: how many rows it ranked over the whole vocabulary)."""
    def one_config(config_index, config_receivers):
        interventions = _build_interventions(config, plan, tables, values, state["source"], config_index)
        if encoder_kind == 2:
            encoded, _ = T5(config).apply({"params": params}, input_ids, attention_mask, interventions,
                                          method=T5.encode)
        else:
            encoded = state["encoded"]
            for patch in interventions.get("encoder", {}).get("hook_out", ()):
                encoded = apply_patch(encoded, patch)
        x = jax.lax.dynamic_index_in_dim(state["states"], start, axis=0, keepdims=False)
        hidden = _suffix(config, params, x, start, encoded, attention_mask, interventions,
                         config_receivers if paths else None)
        hidden = prediction_states(config, hidden, attention_mask)
        if windowed:
            return hidden
        return final_metrics(config, params, hidden, targets, metrics, candidates, foils, top_k, target_mask)

    windowed = "window" in state
    # The config axis lies on the mesh's `configs` axis (when it has one); activations are constrained by name.
    spmd = "configs" if partitioner is not None and partitioner.config_size > 1 else None
    with maybe_activate(partitioner):
        out = jax.vmap(one_config, spmd_axis_name=spmd)(index, receivers)
        if not windowed:
            return out
        hidden = out  # [Kc, B, 1, D]
        others = tuple(m for m in metrics if m != "rank")
        out = jax.vmap(lambda h: final_metrics(config, params, h, targets, others, candidates, foils, top_k),
                       spmd_axis_name=spmd)(hidden) if others or top_k else {}
        table, scale = unembedding_rows(config, params)
        out["rank"], out["decided"], out["full_rows"] = windowed_ranks(hidden[:, :, 0] * scale, table, targets,
                                                                       state["window"])
        return out


class SweepSteps(NamedTuple):
    """The compiled pieces of a sweep: the plan of its terms, its clean-state step and its per-chunk step."""

    plan: tuple[TermPlan, ...]
    clean_state: Any
    config_chunk_step: Any


def sweep_steps(sweep: Sweep) -> SweepSteps:
    """The steps `run_sweep` runs for `sweep` (both jitted: call them, or ``.lower`` them to plan a run, as
    `genir_jax.plan.planning` does), with the plan of its terms they take as ``plan``."""
    return SweepSteps(plan_terms(sweep.terms), clean_state, config_chunk_step)


# --------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------

def _row_bytes(vocab_size: int, candidates: int = 0) -> int:
    """Bytes of float32 temporaries per (config, query) row: one vocabulary block of logits (metrics are
    streamed, `streamed_target_metrics`) and the docid candidates' logits, each about three times over."""
    return 4 * 3 * (min(vocab_size, VOCAB_BLOCK) + candidates)


def default_query_chunk(num_configs: int, vocab_size: int, budget_bytes: int = 1 << 30, candidates: int = 0) -> int:
    """Queries per device and step so the per-row temporaries of `num_configs` configs stay within
    `budget_bytes`; at most 256."""
    per_query = max(1, num_configs) * _row_bytes(vocab_size, candidates)
    return int(max(1, min(256, budget_bytes // per_query)))


def default_config_chunk(query_rows: int, vocab_size: int, budget_bytes: int = 1 << 30, candidates: int = 0) -> int:
    """Configs per step so the per-row temporaries of `query_rows` queries fit `budget_bytes`; at most 512
    (bigger blocks gain nothing at these matmul sizes and pad more)."""
    return int(max(1, min(512, budget_bytes // max(1, query_rows * _row_bytes(vocab_size, candidates)))))


def validate_terms(config: T5Config, sweep: Sweep, encoder_length: int, decoder_length: int = 1) -> None:
    """Raise `InterventionError` for sweep terms the model or the input lengths cannot take."""
    for term in sweep.terms:
        validate(config, {term.stack: {term.local: (Patch(term.table[:1], term.value),)}}, 1, encoder_length,
                 decoder_length, leading=(1,))
        if term.unit is not None:
            layer = None if term.local in STACK_SITES else 0
            length = encoder_length if term.stack == "encoder" else decoder_length
            size = site_shape(config, Site(term.stack, term.local, layer), length, encoder_length)[term.unit_axis]
            if size != term.unit_size:
                what = Site(term.stack, term.local, layer).name
                raise InterventionError(f"site '{what}': the sweep selects units along an axis of size {term.unit_size}, "
                                        f"the site has {size} there (e.g. a position beyond the query length)")
        if term.layer is not None:
            count = num_layers(config, term.stack)
            used = term.layer[term.row >= 0]
            if used.size and (used.min() < 0 or used.max() >= count):
                raise InterventionError(f"{term.stack}.*.{term.local}: layer index out of range 0-{count - 1}")


def check_decoder_only_sweep(sweep: Sweep, source, target_mask, what: str = "sweep", *,
                             source_patching: bool = False, path_patching: bool = False) -> None:
    """Raise `InterventionError` for what the sweep engine (and attribution, `what`) does not support on
    decoder-only models yet. `source_patching` / `path_patching`: the caller runs `FROM_SOURCE` / `Source`
    values and receivers (the sweep engine does; attribution does not yet)."""
    if sweep.receivers is not None and not path_patching:
        raise InterventionError(f"{what}: path patching (receivers) is not supported for decoder-only models")
    if target_mask is not None:
        raise InterventionError(f"{what}: decoder-only models take atomic (one-token) docids only, no target_mask")
    if not source_patching and (source is not None or any(isinstance(t.value, FromSource) for t in sweep.terms)):
        raise InterventionError(f"{what}: FROM_SOURCE / Source patching is not supported for decoder-only models")
    embed = next((t for t in sweep.terms if t.local == "hook_embed"), None)
    if embed is not None:
        raise InterventionError(f"{what}: 'hook_embed' patches are not supported for decoder-only models (GPT-2 adds "
                                "positions after it); patch 'blocks.0.hook_resid_pre' instead")


def _validate_paths(config, sweep: Sweep) -> None:
    """Raise `InterventionError` unless every sender is a component of the last stack (T5's decoder, a
    decoder-only model's blocks) and the receivers table is [K, layers, components]."""
    last = stacks(config)[-1]
    for term in sweep.terms:
        inside = term.local in ("hook_attn_out", "hook_cross_attn_out", "hook_mlp_out") or \
            term.local.startswith(("attn.", "cross_attn.", "mlp."))
        if term.stack != last or not inside:
            where = "decoder" if last == "decoder" else "layer"
            raise InterventionError(f"path patching: senders must be {where} components (their outputs, heads or "
                                    f"neurons); '{term.stack}.*.{term.local}' is not")
    components = sweep.receivers.components
    expected = (num_layers(config, last), len(layer_components(config)))
    if components.ndim != 3 or components.shape[1:] != expected:
        raise InterventionError(f"path patching: receivers must have shape [K, {expected[0]}, {expected[1]}], got "
                                f"{components.shape}")


def check_source_model(config, source_config, stacks_used: Sequence[str] | None = None, where: str = "sweep") -> None:
    """Refuse a source model whose activations cannot stand in for the patched model's (`config`): another family,
    another width (d_model, heads, d_kv, d_ff; key/value heads of a decoder-only model) or another number of layers
    in `stacks_used` (default: every stack). `where` starts the message (the caller, or the source's path)."""
    def family(c) -> str:
        return "a decoder-only model" if is_decoder_only(c) else "a T5"

    if is_decoder_only(config) != is_decoder_only(source_config):
        raise InterventionError(f"{where}: the source model is {family(source_config)}, the patched model "
                                f"{family(config)}; a source model must be of the same family and shape")
    for field in ("d_model", "num_heads", "d_kv", "d_ff") + (("num_kv_heads",) if is_decoder_only(config) else ()):
        if getattr(config, field) != getattr(source_config, field):
            raise InterventionError(f"{where}: the source model's {field}={getattr(source_config, field)} differs "
                                    f"from the patched model's {getattr(config, field)}")
    for stack in stacks(config) if stacks_used is None else sorted(stacks_used):
        if num_layers(config, stack) != num_layers(source_config, stack):
            raise InterventionError(f"{where}: the source model's {stack} has {num_layers(source_config, stack)} "
                                    f"layers, the patched model's {num_layers(config, stack)}")


def _source_inputs(config, source, plan, input_ids, attention_mask):
    names = source_site_names(config, plan)
    if not names:
        return None, None, input_ids, attention_mask
    if source is None:
        raise InterventionError("sweep: FROM_SOURCE values need a `source`")
    check_source_model(config, source.config, {term.stack for term in plan if term.from_source})
    if is_decoder_only(config):
        spec = frozenset(parse_site(config, name).local for name in names)  # the sites DecoderOnly records
    else:
        spec = cache_specs(source.config, names)
    source_ids, source_mask = input_ids, attention_mask
    if source.input_ids is not None:
        source_ids = np.asarray(source.input_ids, dtype=np.int32)
        source_mask = np.asarray(source.attention_mask if source.attention_mask is not None
                                 else np.ones_like(source_ids), dtype=np.int32)
        if source_ids.shape[0] != input_ids.shape[0]:
            raise InterventionError(f"sweep: source inputs have {source_ids.shape[0]} rows for {input_ids.shape[0]} queries")
        if is_decoder_only(config) and source_ids.shape[1] != input_ids.shape[1]:
            raise InterventionError(f"sweep: the source prompts are padded to length {source_ids.shape[1]}, the queries "
                                    f"to {input_ids.shape[1]}; decoder-only source patching reads the same positions, "
                                    "so pad both to one length")
    return spec, source.config, source_ids, source_mask


class _Aggregator:
    """Per-config sums over queries, turned into means / fractions (`summary_columns`)."""

    def __init__(self, count: int, metrics: Sequence[str], hits: Sequence[int], num_queries: int):
        self.metrics, self.hits, self.num_queries = tuple(metrics), tuple(hits), num_queries
        self.sums: dict[str, np.ndarray] = {}
        self.count = count

    def add(self, index: np.ndarray, values: dict[str, np.ndarray], clean: dict[str, np.ndarray]) -> None:
        for name, block in block_aggregates(values, clean, self.metrics, self.hits).items():
            self.sums.setdefault(name, np.zeros(self.count, np.float64))[index] += block

    def result(self) -> dict[str, np.ndarray]:
        return {name: total / max(1, self.num_queries) for name, total in self.sums.items()}


def run_sweep(
    config: T5Config,
    params,
    input_ids,
    attention_mask,
    target_ids,
    sweep,
    *,
    source: Source | None = None,
    metrics: Sequence[str] = ("rank", "logit"),
    candidates=None,
    foil_ids=None,
    top_k: int = 10,
    hits: Sequence[int] = (1, 10),
    target_mask=None,
    query_chunk: int | None = None,
    config_chunk: int | None = None,
    devices=None,
    partitioner: Partitioner | None = None,
    dtype=None,
    prefix_sharing: bool = True,
    rank_window: int = RANK_WINDOW,
    per_query: bool = True,
    store=None,
    progress: bool = True,
    desc: str = "patching sweep",
) -> SweepResult:
    """Run every config of `sweep` on every query; see the module docstring.

    input_ids / attention_mask [N, S]; target_ids [N] token ids; `foil_ids` [N] (for ``logit_diff``).
    Multi-token targets (naive / semantic docids): target_ids [N, T] (each docid's tokens ending with EOS,
    right-padded) with `target_mask` [N, T] (1 on real tokens, a prefix of each row); every decoder run,
    the source's included, then reads the teacher-forced docid, configs patch every decoder position, and
    the metrics (`STEP_REDUCTIONS`: ``rank``, the worst step's rank; ``logprob``, the sequence's) are
    reduced per query; no top-k;
    `candidates`: token ids (e.g. the docid tokens) for ``docid_rank`` and for the top-k (``top_ids``
    then index into `candidates`). `query_chunk`: queries per device per step; `config_chunk`: configs per
    step (defaults from a 1 GiB logits budget). `devices`: the devices queries are sharded over (default:
    all local; results do not depend on their number). `partitioner`: a mesh and rules instead (queries on
    ``data``, configs on ``configs``, parameters split over ``model``; `query_chunk` is then per ``data``
    slice and `config_chunk` a multiple of the ``configs`` size). `dtype` (e.g. ``"bfloat16"``): parameters
    stored and the model computed in it; logits, ranks and metrics are float32 whatever it is. `prefix_sharing=False` runs every decoder layer for
    every config (for checks). `rank_window`: tokens per query whose logits every config computes for the
    full-vocabulary ``rank`` (`genir_jax.interp.rank_window`; used with float32 parameters and single-token targets
    when no metric needs the whole softmax and no top-k over the vocabulary is kept); 0 ranks every row over
    the whole vocabulary (for checks). ``per_query=False`` keeps only per-config aggregates (no [K, N] arrays,
    no top-k). `store`: an object with ``get(key)`` / ``put(key, arrays)`` that keeps finished chunks.
    """
    sweep = as_sweep(sweep)
    input_ids = np.asarray(input_ids, dtype=np.int32)
    attention_mask = np.asarray(attention_mask, dtype=np.int32)
    target_ids = np.asarray(target_ids, dtype=np.int32)
    count, length = input_ids.shape
    unknown = sorted(set(metrics) - set(METRICS))
    twice = next((m for i, m in enumerate(metrics) if m in list(metrics)[:i]), None)
    if twice is not None:
        raise InterventionError(f"sweep: metric {twice!r} is listed twice")
    metrics = tuple(m for m in METRICS if m in metrics)
    if unknown or not metrics:
        raise InterventionError(f"sweep: unknown metric(s) {unknown}; expected some of {', '.join(METRICS)}")
    if count == 0:
        raise InterventionError("sweep: no queries given")
    if target_mask is not None:
        target_mask = check_sequences(target_ids, target_mask, count, metrics)
        top_k = 0
    elif target_ids.shape != (count,):
        raise InterventionError(f"sweep: target_ids must have shape ({count},) (or [{count}, T] with a target_mask), "
                                f"got {target_ids.shape}")
    check_token_ids("target", target_ids, config.vocab_size)
    if candidates is not None:
        candidates = np.asarray(candidates, dtype=np.int32).reshape(-1)
        if candidates.size == 0 or candidates.min() < 0 or candidates.max() >= config.vocab_size:
            raise InterventionError(f"sweep: candidates must be token ids in [0, {config.vocab_size})")
        top_k = min(top_k, candidates.size)
    elif _needing(metrics, "candidates"):
        raise InterventionError(f"sweep: metric '{_needing(metrics, 'candidates')}' needs the docid token ids "
                                "(`candidates`)")
    if _needing(metrics, "foils"):
        if foil_ids is None:
            raise InterventionError(f"sweep: metric '{_needing(metrics, 'foils')}' needs a foil token per query "
                                    "(`foil_ids`)")
        foil_ids = np.asarray(foil_ids, dtype=np.int32).reshape(-1)
        if foil_ids.shape != (count,):
            raise InterventionError(f"sweep: foil_ids must have shape ({count},), got {foil_ids.shape}")
        check_token_ids("foil", foil_ids, config.vocab_size)
        same = np.flatnonzero(foil_ids == target_ids)
        if same.size:
            raise InterventionError(f"sweep: the foil equals the target for query index {int(same[0])}")
    top_k = int(top_k) if per_query else 0
    if is_decoder_only(config):
        check_decoder_only_sweep(sweep, source, target_mask, source_patching=True, path_patching=True)
        decoder_length = length  # the prompt: patches cover its positions, the last real one predicts the docid
    else:
        decoder_length = 1 if target_mask is None else target_ids.shape[1]
    validate_terms(config, sweep, length, decoder_length)
    paths = sweep.receivers is not None
    if paths:
        _validate_paths(config, sweep)
    plan = plan_terms(sweep.terms)
    source_spec, source_config, source_ids, source_mask = _source_inputs(config, source, plan, input_ids,
                                                                         attention_mask)
    source_params = source.params if source_spec is not None else None

    if dtype is not None:
        params = _cast_params(params, dtype)
        source_params = None if source_params is None else _cast_params(source_params, dtype)
    if partitioner is None:
        partitioner = current() if devices is None and current() is not None else Partitioner.data_parallel(devices)
    rows_sharding = partitioner.sharding(("batch",))
    replicated = partitioner.replicated
    params = partitioner.shard_params(params, logical_axes(config))
    if source_params is not None:
        source_params = partitioner.shard_params(source_params, logical_axes(source_config))
    num_configs = sweep.size
    shards = partitioner.data_size
    per_device = query_chunk or _balanced_chunk(-(-count // shards), 64)
    rows_per_step = per_device * shards
    config_chunk = config_chunk or default_config_chunk(rows_per_step * decoder_length, config.vocab_size,
                                                       candidates=0 if candidates is None else len(candidates))
    config_chunk = -(-config_chunk // partitioner.config_size) * partitioner.config_size

    # Clean state, once per query chunk.
    foil_ids = foil_ids if _needing(metrics, "foils") else None
    foils_arg = foil_ids if foil_ids is not None else np.zeros(count, np.int32)
    mask_arg = target_mask if target_mask is not None else np.zeros(count, np.int32)
    cand_dev = None if candidates is None else jax.device_put(candidates, replicated)
    window = rank_window if (rank_window > 0 and "rank" in metrics and target_mask is None
                             and "logprob" not in metrics and not (top_k and candidates is None)
                             and jnp.result_type(unembedding_rows(config, params)[0]) == jnp.float32) else 0
    chunks, clean_parts = [], []
    for batch in batches((input_ids, attention_mask, source_ids, source_mask, target_ids, foils_arg, mask_arg),
                         rows_per_step):
        ids, mask, s_ids, s_mask, targets, foils, tmask = (jax.device_put(a, rows_sharding) for a in batch.arrays)
        foils = foils if foil_ids is not None else None
        tmask = tmask if target_mask is not None else None
        state, clean = clean_state(params, source_params, ids, mask, s_ids, s_mask, targets, foils, cand_dev,
                                    tmask, config=config, source_config=source_config or config,
                                    source_spec=source_spec, metrics=metrics, top_k=0, window=window,
                                    partitioner=partitioner)
        chunks.append((batch.rows, ids, mask, targets, foils, tmask, state))
        clean_parts.append((batch.rows, fetch(clean)))
    clean_values = {m: np.concatenate([np.asarray(c[m])[: len(rows)] for rows, c in clean_parts]) for m in metrics}

    # Config groups: same encoder handling and same first decoder layer.
    first, encoder_kind = first_decoder_layer(config, sweep)
    if not prefix_sharing:
        first = np.zeros_like(first)
    first = np.where(encoder_kind == 2, 0, first)
    blocks = []  # (encoder kind, start layer, config indices)
    for kind in np.unique(encoder_kind):
        for start in np.unique(first[encoder_kind == kind]):
            index = np.flatnonzero((encoder_kind == kind) & (first == start))
            blocks += [(int(kind), int(start), index[i:i + config_chunk]) for i in range(0, len(index), config_chunk)]

    tables, values = _term_constants(sweep, replicated)
    aggregator = _Aggregator(num_configs, metrics, hits, count)
    per_query_values = {m: np.zeros((num_configs, count), np.float32 if m not in RANK_METRICS else np.int32)
                        for m in metrics} if per_query else None
    top_ids = np.zeros((num_configs, count, top_k), np.int32) if top_k else None
    top_logits = np.zeros((num_configs, count, top_k), np.float32) if top_k else None
    started = time.perf_counter()
    bar = compiling_bar(total=num_configs * count, desc=desc, unit="cfg·q", unit_scale=True, disable=not progress,
                        smoothing=0.1)
    computed_configs, window_work = 0, {"decided": 0, "full_rows": 0}
    for block_number, (kind, start, index) in enumerate(blocks):
        key = f"block-{block_number:06d}"
        stored = store.get(key) if store is not None else None
        if stored is None:
            block_values, block_top, block_work = _run_block(
                config, params, chunks, sweep, plan, tables, values, index, kind, start, paths, metrics, top_k,
                config_chunk, partitioner, cand_dev, bar, count)
            computed_configs += len(index)
            for name in window_work:
                window_work[name] += block_work[name]
            if store is not None:
                store.put(key, {"index": index, **{f"value:{m}": v for m, v in block_values.items()},
                                **({"top_ids": block_top[0], "top_logits": block_top[1]} if block_top else {})})
        else:
            if not np.array_equal(stored["index"], index):
                raise InterventionError(f"sweep store: chunk {key} holds other configs; the store belongs to "
                                        "another sweep")
            block_values = {m: stored[f"value:{m}"] for m in metrics}
            block_top = (stored["top_ids"], stored["top_logits"]) if top_k else None
            bar.update(len(index) * count)
        aggregator.add(index, block_values, clean_values)
        if per_query_values is not None:
            for m in metrics:
                per_query_values[m][index] = block_values[m]
        if top_k:
            top_ids[index], top_logits[index] = block_top
    bar.close()
    layers = num_layers(config, stacks(config)[-1])
    stats = {
        "configs": num_configs, "queries": count, "blocks": len(blocks), "config_chunk": config_chunk,
        "query_rows_per_step": rows_per_step, "configs_computed": computed_configs, "rank_window": window,
        # rank window: the share of computed (config, query) ranks its bound decided, and the rows ranked over
        # the whole vocabulary (the undecided ones, padded to the fallback block; every row when too many)
        "rank_rows_decided": window_work["decided"] / max(1, computed_configs * count) if window else 0.0,
        "rank_rows_full_vocabulary": window_work["full_rows"],
        "seconds": time.perf_counter() - started,
        "decoder_layers_skipped_fraction": float(np.mean(np.minimum(first, layers)) / layers) if layers else 0.0,
    }
    return SweepResult(sweep=sweep, metrics=metrics, clean=clean_values, aggregates=aggregator.result(),
                       values=per_query_values, top_ids=top_ids, top_logits=top_logits, stats=stats)


def _cast_params(params, dtype):
    dtype = jnp.dtype(dtype)
    return jax.tree_util.tree_map(lambda x: x if jnp.result_type(x) == dtype else jnp.asarray(x, dtype), params)


def _needing(metrics: Sequence[str], what: str) -> str | None:
    """The first of `metrics` that needs `what` ("candidates" or "foils"), if any."""
    return next((m for m in metrics if what in METRIC_TABLE[m].needs), None)


def _balanced_chunk(count: int, limit: int) -> int:
    """The smallest chunk size that covers `count` rows in as few chunks as `limit`-sized chunks would."""
    chunks = -(-count // limit)
    return -(-count // chunks)


def check_sequences(targets: np.ndarray, target_mask, count: int, metrics: Sequence[str], what: str = "sweep"
                     ) -> np.ndarray:
    """Validate multi-token targets [N, T] and their mask; returns the mask as int32."""
    target_mask = np.asarray(target_mask, dtype=np.int32)
    if targets.ndim != 2 or targets.shape[0] != count or target_mask.shape != targets.shape:
        raise InterventionError(f"{what}: target sequences need target_ids and target_mask of shape [{count}, T], got "
                                f"{targets.shape} and {target_mask.shape}")
    lengths = target_mask.sum(axis=1)
    if lengths.min() < 1 or np.any(target_mask != (np.arange(targets.shape[1])[None] < lengths[:, None])):
        raise InterventionError(f"{what}: every target_mask row must be a non-empty prefix (the docid's tokens, "
                                "then padding)")
    other = [m for m in metrics if m not in STEP_REDUCTIONS]
    if other:
        raise InterventionError(f"{what}: metric '{other[0]}' is not defined for multi-token targets; use "
                                f"{' or '.join(STEP_REDUCTIONS)}")
    return target_mask


def check_token_ids(what: str, ids: np.ndarray, vocab_size: int) -> None:
    """Raise `InterventionError` for `what` token ids outside the vocabulary."""
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise InterventionError(f"sweep: {what} token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")


def _term_constants(sweep: Sweep, replicated) -> tuple[tuple, tuple]:
    """Per term: its mask table with an all-zero row appended (row -1 selects it) and its value."""
    tables, values = [], []
    for term in sweep.terms:
        table = np.concatenate([term.table, np.zeros((1,) + term.table.shape[1:], np.float32)])
        tables.append(jax.device_put(table, replicated))
        values.append(None if isinstance(term.value, FromSource) else jax.device_put(jnp.asarray(term.value), replicated))
    return tuple(tables), tuple(values)


def _run_block(config, params, chunks, sweep, plan, tables, values, index, kind, start, paths, metrics, top_k,
               config_chunk, partitioner, candidates, bar, count):
    """One chunk of configs on every query chunk: per-query values [Kc, N], the top-k (or None) and the rank
    window's work (rows its bound decided, rows ranked over the whole vocabulary)."""
    # Pad a short block only to the next power of two: few compiled shapes, little wasted work.
    bucket = min(config_chunk, 1 << max(0, int(len(index) - 1).bit_length()))
    bucket = -(-bucket // partitioner.config_size) * partitioner.config_size  # configs split evenly
    padded = pad_rows(index, bucket) if len(index) < bucket else index
    by_config = partitioner.sharding(("configs",))
    term_index = []
    for term in sweep.terms:
        table_rows = term.table.shape[0]
        row = np.where(term.row[padded] < 0, table_rows, term.row[padded])
        layer = term.layer[padded] if term.layer is not None else np.zeros(len(padded), np.int64)
        unit = term.unit[padded] if term.unit is not None else np.zeros(len(padded), np.int64)
        term_index.append(tuple(jax.device_put(a.astype(np.int32), by_config) for a in (row, layer, unit)))
    receivers = None
    if paths:
        receivers = (jax.device_put(sweep.receivers.components[padded].astype(np.float32), by_config),
                     jax.device_put(sweep.receivers.logits[padded].astype(np.float32), by_config))
    else:  # a placeholder vmapped alongside the configs
        receivers = jax.device_put(np.zeros((len(padded),), np.float32), by_config)
    values_out = {m: np.zeros((len(index), count), np.float32 if m not in RANK_METRICS else np.int32) for m in metrics}
    top = (np.zeros((len(index), count, top_k), np.int32), np.zeros((len(index), count, top_k), np.float32)) \
        if top_k else None
    work = {"decided": 0, "full_rows": 0}
    for rows, ids, mask, targets, foils, tmask, state in chunks:
        out = config_chunk_step(params, state, ids, mask, targets, foils, candidates, tables, values, tuple(term_index),
                           receivers, jnp.int32(start), tmask, config=config, plan=plan, encoder_kind=kind,
                           paths=paths, metrics=metrics, top_k=top_k, partitioner=partitioner)
        out = fetch(out)  # gathered from every process on a multi-host mesh
        n = len(rows)
        for m in metrics:
            values_out[m][:, rows] = np.asarray(out[m])[: len(index), :n]
        if top_k:
            top[0][:, rows] = np.asarray(out["top"][0])[: len(index), :n]
            top[1][:, rows] = np.asarray(out["top"][1])[: len(index), :n]
        if "decided" in out:
            work["decided"] += int(np.asarray(out["decided"])[: len(index), :n].sum())
            work["full_rows"] += int(out["full_rows"])
        bar.update(len(index) * n)
    return values_out, top, work


# --------------------------------------------------------------------------------------------------
# Inputs of common modes and metrics
# --------------------------------------------------------------------------------------------------

def derangement(count: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(count) without fixed points (count >= 2): for resampling, every
    query gets another query's activations."""
    if count < 2:
        raise InterventionError("resampling needs at least 2 queries (each is patched with another's)")
    rng = np.random.default_rng(seed)
    while True:
        permutation = rng.permutation(count)
        if not np.any(permutation == np.arange(count)):
            return permutation


def resample_source(config: T5Config, params, input_ids, attention_mask, seed: int = 0) -> Source:
    """The `Source` of resample ablation: the same model on a seeded derangement of the queries."""
    permutation = derangement(len(input_ids), seed)
    return Source(config, params, np.asarray(input_ids)[permutation], np.asarray(attention_mask)[permutation])


_t5_forward = jax.jit(t5_model.forward, static_argnums=0)


def runner_up_foils(config: T5Config, params, input_ids, attention_mask, target_ids, candidates,
                    chunk: int | None = None) -> np.ndarray:
    """Per query, the candidate (docid) token the clean model scores highest besides the target: the
    natural foil of ``logit_diff`` (decoder-only models: scored at the last real prompt token)."""
    candidates = np.asarray(candidates, np.int32)
    target_ids = np.asarray(target_ids, np.int32)
    if candidates.size < 2:
        raise InterventionError("runner-up foils need at least 2 candidate tokens")
    out = []
    for batch in batches((np.asarray(input_ids), np.asarray(attention_mask)), chunk or min(32, len(input_ids))):
        ids, mask = batch.arrays
        if is_decoder_only(config):
            logits = decoder_only.forward(config, params, ids, mask)
            logits = prediction_states(config, logits, mask)[:, 0]
        else:
            start = np.full((ids.shape[0], 1), config.decoder_start_token_id, dtype=np.int32)
            logits = _t5_forward(config, params, ids, mask, start)[:, 0]
        out.append(np.asarray(logits, np.float32)[: batch.size][:, candidates])
    scores = np.concatenate(out)
    scores[candidates[None, :] == target_ids[:, None]] = -np.inf
    return candidates[np.argmax(scores, axis=1)].astype(np.int32)
