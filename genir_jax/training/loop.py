"""The seq2seq training step: shifted decoder inputs, masked cross-entropy, optax update, data parallel.

A batch is a dict of int32 arrays: ``input_ids`` / ``attention_mask`` [B, S] for the encoder and
``targets`` / ``target_mask`` [B, T] for the decoder. Decoder inputs are the targets shifted right with
the decoder start token (0) in front, as T5 trains; for atomic-docid DSI the target is the single docid
token, so the decoder sees only the start token. The loss is the mean token cross-entropy over the
target positions with ``target_mask == 1`` of the whole (global) batch. A decoder-only model's batch
(`genir_jax.training.decoder_dsi`, `causal_lm_loss`) has the same four arrays: ``targets`` are the next tokens
of ``input_ids`` and ``target_mask`` marks the positions that predict a docid.

Placement: a `genir_jax.scale.partitioning.Partitioner` (or a plain mesh, e.g. `data_mesh`'s one-axis
``"data"`` mesh, which is data parallel): the batch is split along its first axis over ``data``;
parameters and the optimizer state are placed as the logical-axis rules say (replicated on a data-only
mesh; `mlp` / `heads` / `vocab` split over ``model`` on a 2-D mesh); XLA inserts the collectives
(`jax.jit` with `NamedSharding`). With one device this is ordinary `jax.jit`.

Mixed precision: ``compute_dtype=jnp.bfloat16`` runs the forward in bfloat16 on float32 master
parameters (the model casts weights at use); the loss and the update stay in float32.

Randomness: the state carries a raw PRNG key; the dropout key of step ``s`` is ``fold_in(key, s)``,
so a run restored at step ``s`` draws exactly the dropout masks the uninterrupted run would have.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from genir_jax.core.config import T5Config
from genir_jax.base.errors import ConfigError
from genir_jax.core import decoder_only
from genir_jax.core.model import forward, logical_axes
from genir_jax.core.sites import is_decoder_only
from genir_jax.scale.partitioning import Partitioner, maybe_activate

FINAL_NORM_SITE = "ln_final.hook_normalized"  # a decoder-only model's final norm before its scale (and bias)

DATA_AXIS = "data"
BATCH_KEYS = ("input_ids", "attention_mask", "targets", "target_mask")


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: update count, parameters, optimizer state, and the run's PRNG key."""

    step: jnp.ndarray  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    rng: jnp.ndarray  # uint32 [2]: raw PRNG key (dropout keys are folded from it)


def create_state(params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state at step 0 (float32 parameters are copied, never aliased)."""
    params = jax.tree_util.tree_map(lambda x: jnp.array(x, dtype=jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(seed))


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis ``("data",)`` mesh over `devices` (default: all local devices)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ConfigError("no devices to train on")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def as_partitioner(mesh: "Mesh | Partitioner") -> Partitioner:
    """A partitioner for a mesh (default rules) or the partitioner itself."""
    return mesh if isinstance(mesh, Partitioner) else Partitioner(mesh)


def _mesh(mesh: "Mesh | Partitioner") -> Mesh:
    return mesh.mesh if isinstance(mesh, Partitioner) else mesh


def replicated(mesh: "Mesh | Partitioner") -> NamedSharding:
    return NamedSharding(_mesh(mesh), PartitionSpec())


def batch_sharded(mesh: "Mesh | Partitioner") -> NamedSharding:
    """Batch arrays split along their first axis over the mesh's data axis."""
    return as_partitioner(mesh).batch_sharding(1)


def state_shardings(mesh: "Mesh | Partitioner", config: T5Config, optimizer: optax.GradientTransformation,
                    params) -> TrainState:
    """Where each part of a `TrainState` lives: parameters and optimizer state as the partitioner's
    rules say, the step and the PRNG key replicated."""
    partitioner = as_partitioner(mesh)
    axes = decoder_only.logical_axes(config) if is_decoder_only(config) else logical_axes(config)
    return TrainState(step=partitioner.replicated, params=partitioner.param_shardings(axes, params),
                      opt_state=partitioner.opt_state_shardings(optimizer, params, axes),
                      rng=partitioner.replicated)


def shift_right(targets: jnp.ndarray, start_id: int) -> jnp.ndarray:
    """Decoder inputs for teacher forcing: [start, t_0, ..., t_{T-2}]."""
    start = jnp.full((targets.shape[0], 1), start_id, dtype=targets.dtype)
    return jnp.concatenate([start, targets[:, :-1]], axis=1)


def cross_entropy(logits: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray) -> tuple[jnp.ndarray, dict]:
    """Mean cross-entropy over masked target positions (float32), and token accuracy / count.

    Written as ``logsumexp - target logit``, and the accuracy (argmax == target, the first index winning a
    tie) as a comparison with the maximum: the same values as ``log_softmax`` + ``argmax``, without a full
    [B, T, V] log-probability array or XLA:CPU's slow variadic argmax reduction (a 34k-way head's loss and
    gradient: 15 ms -> 9 ms for 64 rows)."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    mask = mask.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    loss = (nll * mask).sum() / count
    observed, observed_target = jax.lax.stop_gradient(logits), jax.lax.stop_gradient(target_logit)
    top = observed.max(axis=-1)
    index = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
    earlier_tie = ((observed == top[..., None]) & (index < targets[..., None])).any(axis=-1)
    correct = ((observed_target >= top) & ~earlier_tie).astype(jnp.float32)
    return loss, {"accuracy": (correct * mask).sum() / count, "tokens": mask.sum()}


def seq2seq_loss(config: T5Config, params, batch: dict, *, dropout_rng=None, compute_dtype=None, partitioner=None,
                 unroll_layers: bool = False):
    """(loss, metrics) of a batch; dropout is on when `dropout_rng` is given. The forward folds short
    cross-attention (`genir_jax.core.model.forward_with_cache`: a DSI decoder's one step never projects the
    encoder output to keys and values) and unrolls the layers if asked. Activations are constrained by
    `partitioner`'s rules (the caller's jit must be keyed by it: `make_train_step` makes one per partitioner)."""
    decoder_input_ids = shift_right(batch["targets"], config.decoder_start_token_id)
    with maybe_activate(partitioner):
        logits = forward(config, params, batch["input_ids"], batch["attention_mask"], decoder_input_ids,
                         deterministic=dropout_rng is None, dropout_rng=dropout_rng, dtype=compute_dtype,
                         fold_cross_attention=True, unroll_layers=unroll_layers)
    return cross_entropy(logits, batch["targets"], batch["target_mask"])


def causal_lm_loss(config, params, batch: dict, *, compute_dtype=None, partitioner=None,
                   scored_per_row: int | None = None):
    """(loss, metrics) of a decoder-only batch (`genir_jax.core.decoder_only`, no dropout): ``targets`` [B, S]
    are the next tokens of ``input_ids`` [B, S] and ``target_mask`` marks the positions that are scored
    (`genir_jax.training.decoder_dsi`: the positions that predict a docid token).

    `scored_per_row` (no row scores more positions): the head's logits are computed at only that many positions
    per row (the scored ones first, in order), not at all S: a DSI row scores one to a few, and the head over a
    32k vocabulary is most of the step's cost. The same loss and metrics as all positions (tested)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if scored_per_row is None or scored_per_row >= ids.shape[1]:
        with maybe_activate(partitioner):
            logits = decoder_only.forward(config, params, ids, mask, dtype=compute_dtype)
        return cross_entropy(logits, batch["targets"], batch["target_mask"])
    with maybe_activate(partitioner):  # the unused full logits are dropped by jit
        _, recorded = decoder_only.forward_with_cache(config, params, ids, mask, cache_sites=[FINAL_NORM_SITE],
                                                      dtype=compute_dtype)
    order = jnp.argsort(-batch["target_mask"], axis=1, stable=True)[:, :scored_per_row]  # scored positions first
    normed = jnp.take_along_axis(recorded[FINAL_NORM_SITE], order[..., None], axis=1)
    norm = params["final_norm"]
    hidden = normed * norm["scale"].astype(normed.dtype)[None, None]
    if "bias" in norm:  # GPT-2's LayerNorm
        hidden = hidden + norm["bias"].astype(normed.dtype)[None, None]
    logits = decoder_only.unembed(config, params, hidden)
    return cross_entropy(logits, jnp.take_along_axis(batch["targets"], order, axis=1),
                         jnp.take_along_axis(batch["target_mask"], order, axis=1))


def training_loss(config, params, batch: dict, *, dropout_rng=None, compute_dtype=None, partitioner=None,
                  unroll_layers: bool = False, scored_per_row: int | None = None):
    """The loss of the model family of `config`: `seq2seq_loss` (T5) or `causal_lm_loss` (decoder-only, whose
    layers are always scanned and which has no dropout)."""
    if is_decoder_only(config):
        return causal_lm_loss(config, params, batch, compute_dtype=compute_dtype, partitioner=partitioner,
                              scored_per_row=scored_per_row)
    return seq2seq_loss(config, params, batch, dropout_rng=dropout_rng, compute_dtype=compute_dtype,
                        partitioner=partitioner, unroll_layers=unroll_layers)


def make_train_step(config: T5Config, optimizer: optax.GradientTransformation, mesh: "Mesh | Partitioner", *,
                    schedule: Callable | None = None, dropout: bool = True,
                    compute_dtype=None, shardings: TrainState | None = None, unroll_layers: bool = False,
                    scored_per_row: int | None = None) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """A jitted ``step(state, batch) -> (state, metrics)`` sharded over `mesh` (the state is donated).

    `shardings`: the state's (`state_shardings`); None replicates it (a data-parallel mesh).
    `unroll_layers`: layers as straight-line code (`RunSpec.unroll_layers`); `scored_per_row`: see
    `causal_lm_loss` (decoder-only models)."""
    use_dropout = dropout and getattr(config, "dropout_rate", 0.0) > 0  # decoder-only models have none
    partitioner = as_partitioner(mesh)
    state_sharding = shardings if shardings is not None else partitioner.replicated

    def step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step) if use_dropout else None

        def loss_fn(params):
            return training_loss(config, params, batch, dropout_rng=rng, compute_dtype=compute_dtype,
                                partitioner=partitioner, unroll_layers=unroll_layers, scored_per_row=scored_per_row)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(step, in_shardings=(state_sharding, batch_sharded(partitioner)),
                   out_shardings=(state_sharding, partitioner.replicated), donate_argnums=(0,))


@functools.lru_cache(maxsize=16)
def make_eval_step(config: T5Config, compute_dtype=None) -> Callable[[Any, dict], tuple[jnp.ndarray, dict]]:
    """A jitted ``eval(params, batch) -> (loss, metrics)`` without dropout (one per config, cached)."""
    def evaluate(params, batch):
        batch = {k: jnp.asarray(batch[k], dtype=jnp.int32) for k in BATCH_KEYS}
        return training_loss(config, params, batch, compute_dtype=compute_dtype)

    return jax.jit(evaluate)


def local_rows(mesh: "Mesh | Partitioner", batch_size: int) -> np.ndarray:
    """The rows of a global batch of `batch_size` that this process's devices hold, sorted (every row in a
    one-process run). A multi-process run loads, tokenizes and transfers only these."""
    sharding = batch_sharded(mesh)
    if sharding.is_fully_addressable:
        return np.arange(batch_size)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    return np.asarray(sorted(rows), dtype=np.int64)


def put_local_batch(local: dict, rows: np.ndarray, batch_size: int, mesh: "Mesh | Partitioner") -> dict:
    """The global batch of `batch_size` rows split along the data axis, from this process's `rows` of it
    (`local_rows`; ``local[k][i]`` is global row ``rows[i]``): each process contributes only its rows
    (`jax.make_array_from_callback`), so no process ever holds the whole batch."""
    partitioner = as_partitioner(mesh)
    devices = partitioner.data_size
    if batch_size % devices:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {devices} devices of the data mesh")
    rows = np.asarray(rows, dtype=np.int64)
    arrays = {k: np.asarray(local[k], dtype=np.int32) for k in BATCH_KEYS}
    for name, array in arrays.items():
        if len(array) != len(rows):
            raise ConfigError(f"batch array '{name}' has {len(array)} rows for {len(rows)} row indices")
    sharding = batch_sharded(partitioner)
    if sharding.is_fully_addressable:
        if not np.array_equal(rows, np.arange(batch_size)):
            raise ConfigError("a one-process batch needs all of its rows")
        return jax.device_put(arrays, sharding)
    position = np.full(batch_size, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))

    def place(array: np.ndarray):
        def shard(index):
            wanted = position[index[0]]
            if (wanted < 0).any():
                raise ConfigError("a device of this process needs a batch row the process did not load")
            return array[wanted][(slice(None),) + tuple(index[1:])]

        return jax.make_array_from_callback((batch_size,) + array.shape[1:], sharding, shard)

    return {name: place(array) for name, array in arrays.items()}


def put_batch(batch: dict, mesh: "Mesh | Partitioner") -> dict:
    """Place a whole host batch on the mesh, split along the batch axis (each process transfers only its
    rows); checks divisibility."""
    size = len(next(iter(batch.values())))
    if batch_sharded(mesh).is_fully_addressable or size % as_partitioner(mesh).data_size:
        return put_local_batch(batch, np.arange(size), size, mesh)
    rows = local_rows(mesh, size)
    return put_local_batch({k: np.asarray(batch[k])[rows] for k in BATCH_KEYS}, rows, size, mesh)


def put_state(state: TrainState, mesh: "Mesh | Partitioner", shardings: TrainState | None = None) -> TrainState:
    """Place a state on the mesh as `shardings` say (`state_shardings`; None: replicated). On a mesh that
    spans several processes the state is copied through the host first (every process holds the same
    values; each transfers only its devices' shards)."""
    target = shardings if shardings is not None else replicated(mesh)
    if not all(s.is_fully_addressable for s in jax.tree_util.tree_leaves(
            target, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
        state = jax.device_get(state)
    return jax.device_put(state, target)
