"""Run by tests/scale/test_partitioning.py in a subprocess with 8 simulated CPU devices: forward, sweep and one
training step on meshes 1x1, 8x1, 4x2, 2x4, 1x8 (data x model) against one unsharded device, a bfloat16
sweep against the float32 one, and (given a safetensors checkpoint directory as argument) a sharded load on
a 4x2 mesh; prints JSON."""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np
import optax

import genir_jax as gj
from genir_jax.interp import sweep as sw
from genir_jax.core.model import forward, logical_axes, param_shapes
from genir_jax.scale.partitioning import Partitioner, put_rows
from genir_jax.interp.patching import run_sweep
from genir_jax.training.loop import (create_state, data_mesh, make_train_step, put_batch, put_state,
                                     state_shardings)

MESHES = ("data=1,model=1", "data=8", "data=4,model=2", "data=2,model=4", "data=1,model=8")
CONFIG = gj.t5_v1_0(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                           num_heads=8, dropout_rate=0.0)
SPLIT_BY_MODEL = {"mlp", "heads", "vocab"}  # what DEFAULT_RULES put on `model`, written out independently


def expected_shard(shape, names, model):
    return tuple(size // model if name in SPLIT_BY_MODEL else size for size, name in zip(shape, names))


def main(checkpoint: str | None = None) -> dict:
    assert jax.device_count() == 8, jax.device_count()
    started = time.perf_counter()
    params = gj.init_params(CONFIG, 1)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, CONFIG.vocab_size, (8, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[3, 5:] = 0
    start = np.zeros((8, 1), np.int32)
    one = jax.devices()[:1]
    reference_logits = np.asarray(forward(CONFIG, params, ids, mask, start))
    targets = reference_logits[:, 0].argmax(-1).astype(np.int32)
    grid = sw.concat(sw.site_grid(CONFIG, "decoder.*.attn.hook_z", unit="head"),
                     sw.site_grid(CONFIG, "decoder.0.mlp.hook_post", unit="neuron", units=range(8)))
    reference_sweep = run_sweep(CONFIG, params, ids, mask, targets, grid, devices=one, prefix_sharing=False,
                                progress=False)
    optimizer = optax.sgd(0.5, momentum=0.9)  # updates linear in the gradients (Adam's first step is sign-like)
    batch = {"input_ids": ids, "attention_mask": mask,
             "targets": rng.integers(2, CONFIG.vocab_size, (8, 2)).astype(np.int32),
             "target_mask": np.ones((8, 2), np.int32)}
    plain = data_mesh(one)
    step = make_train_step(CONFIG, optimizer, plain, dropout=False)
    state, metrics = step(put_state(create_state(params, optimizer, 0), plain), put_batch(batch, plain))
    reference_params = jax.device_get(state.params)
    reference_loss = float(metrics["loss"])

    names = jax.tree_util.tree_leaves(logical_axes(CONFIG), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shapes = [s.shape for s in jax.tree_util.tree_leaves(param_shapes(CONFIG))]
    out = {"cases": {}}
    for text in MESHES:
        p = Partitioner(text)
        model = p.axis_size("model")
        case = {}
        tick = time.perf_counter()
        sharded = p.shard_params(params, logical_axes(CONFIG))
        with p.activate():
            logits = forward(CONFIG, sharded, put_rows(ids, p), put_rows(mask, p), put_rows(start, p))
        case["forward_max_diff"] = float(np.abs(np.asarray(logits) - reference_logits).max())
        result = run_sweep(CONFIG, params, ids, mask, targets, grid, partitioner=p, prefix_sharing=False,
                           progress=False)
        case["sweep_ranks_equal"] = bool(np.array_equal(result.ranks, reference_sweep.ranks))
        case["sweep_logit_max_diff"] = float(np.abs(result.values["logit"] - reference_sweep.values["logit"]).max())
        shardings = state_shardings(p, CONFIG, optimizer, params)
        step = make_train_step(CONFIG, optimizer, p, dropout=False, shardings=shardings)
        state = put_state(create_state(params, optimizer, 0), p, shardings)
        state, metrics = step(state, put_batch(batch, p))
        case["loss_diff"] = abs(float(metrics["loss"]) - reference_loss)
        case["params_max_diff"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
            jax.tree_util.tree_leaves(jax.device_get(state.params)), jax.tree_util.tree_leaves(reference_params)))
        wrong = []
        momentum = jax.tree_util.tree_leaves(state.opt_state[0].trace)
        for (path, leaf), logical, shape, mu in zip(jax.tree_util.tree_flatten_with_path(state.params)[0], names,
                                                    shapes, momentum):
            want = expected_shard(shape, tuple(logical), model)
            for what, array in (("param", leaf), ("momentum", mu)):
                got = tuple(array.addressable_shards[0].data.shape)
                if got != want:
                    wrong.append(f"{what} {jax.tree_util.keystr(path)}: shard {got}, expected {want}")
        case["shard_shape_errors"] = wrong
        case["seconds"] = time.perf_counter() - tick
        case["mlp_wi_shard"] = list(state.params["decoder"]["layers"]["mlp"]["wi"].addressable_shards[0].data.shape)
        out["cases"][text] = case
    bf16 = run_sweep(CONFIG, params, ids, mask, targets, grid, devices=one, prefix_sharing=False, progress=False,
                     dtype="bfloat16")  # bf16 parameters and compute, float32 logits and metrics
    out["bf16"] = {"identical": float(np.mean(bf16.ranks == reference_sweep.ranks)),
                   "configs_identical": float(np.mean(np.all(bf16.ranks == reference_sweep.ranks, axis=1))),
                   "within_1": float(np.mean(np.abs(bf16.ranks - reference_sweep.ranks) <= 1)),
                   "logit_max_diff": float(np.abs(bf16.values["logit"] - reference_sweep.values["logit"]).max()),
                   "logit_max": float(np.abs(reference_sweep.values["logit"]).max()),
                   "dtypes": sorted({str(bf16.values["logit"].dtype), str(bf16.clean["logit"].dtype)}),
                   "rank_dtype": str(bf16.values["rank"].dtype)}
    configs = run_sweep(CONFIG, params, ids, mask, targets, grid, partitioner=Partitioner("data=2,configs=2,model=2"),
                        prefix_sharing=False, progress=False)  # the config axis split too
    out["configs_mesh_sweep_ranks_equal"] = bool(np.array_equal(configs.ranks, reference_sweep.ranks))
    if checkpoint:
        out["load"] = sharded_load(checkpoint)
    out["seconds"] = time.perf_counter() - started
    return out


def sharded_load(directory: str) -> dict:
    """A 4x2 sharded safetensors load against the plain one: values, and whether any model-split tensor
    was read whole."""
    import genir_jax.checkpoints.hf as hf

    plain = hf.load_pretrained(directory, load_tokenizer=False)
    p = Partitioner("data=4,model=2")
    files = hf.WeightFiles(directory)
    config, sharded = hf.sharded_params_from_safetensors(plain.config, files, p)
    files.close()
    leaves = jax.tree_util.tree_leaves_with_path(plain.params)
    got = dict(jax.tree_util.tree_leaves_with_path(sharded))
    different = [jax.tree_util.keystr(k) for k, v in leaves if not np.array_equal(np.asarray(got[k]), np.asarray(v))]
    shapes = {name: spec.hf_shape for spec in hf.hf_tensor_specs(config) for name in [spec.hf_name]}
    split = ("DenseReluDense.wi", "DenseReluDense.wo", "SelfAttention.q", "SelfAttention.o", "EncDecAttention.k")
    whole = [name for name, spans in files.slices_read if any(s in name for s in split)
             and tuple(b - a for a, b in spans) == shapes[name]]
    partial = [name for name, spans in files.slices_read if tuple(b - a for a, b in spans) != shapes[name]]
    return {"different": different, "whole_reads_of_split_tensors": whole, "partial_reads": len(partial),
            "reads": len(files.slices_read),
            "wi_shard": list(sharded["decoder"]["layers"]["mlp"]["wi"].addressable_shards[0].data.shape)}


if __name__ == "__main__":
    json.dump(main(sys.argv[1] if len(sys.argv) > 1 else None), sys.stdout)
