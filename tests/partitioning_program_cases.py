"""Run by tests/scale/test_partitioning.py in a subprocess with 8 simulated CPU devices: `forward` and a sweep
under two meshes and two rule sets, one after the other, with the same shapes. The model reads its rules and
mesh from a context, which jit's cache does not see; each run must still compile its own program, shown by
the shard shape of the recorded ``hook_resid_pre`` (constrained to ``("batch", "length", "embed")``) and by
the sweeps' results. Prints JSON."""

from __future__ import annotations

import json

import jax
import numpy as np

import genir_jax as gj
from genir_jax.core.model import forward, forward_with_cache, logical_axes
from genir_jax.interp import sweep as sw
from genir_jax.interp.patching import run_sweep
from genir_jax.scale.partitioning import Partitioner, merge_rules

CONFIG = gj.t5_v1_0(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=4,
                    dropout_rate=0.0)
SITE = "encoder.0.hook_resid_pre"


def main() -> dict:
    assert jax.device_count() == 8, jax.device_count()
    params = gj.init_params(CONFIG, 2)
    rng = np.random.default_rng(2)
    ids = rng.integers(2, CONFIG.vocab_size, (8, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    start = np.zeros((8, 1), np.int32)
    reference = np.asarray(forward(CONFIG, params, ids, mask, start))
    targets = reference[:, 0].argmax(-1).astype(np.int32)
    grid = sw.site_grid(CONFIG, "decoder.*.attn.hook_z", unit="head")
    plain = run_sweep(CONFIG, params, ids, mask, targets, grid, devices=jax.devices()[:1], prefix_sharing=False,
                      progress=False)
    partitioners = {"data=8": Partitioner("data=8"), "data=2,model=4": Partitioner("data=2,model=4"),
                    "data=8 batch=none": Partitioner("data=8", merge_rules("batch=none"))}
    out = {"forward": {}, "sweep": {}}
    for _ in range(2):  # twice round: the second visit of each partitioner must find its own program again
        for name, p in partitioners.items():
            placed = jax.device_put(params, p.replicated)  # parameters as they lie: only the rules shard activations
            rows = jax.device_put(ids, p.replicated), jax.device_put(mask, p.replicated), \
                jax.device_put(start, p.replicated)
            with p.activate():
                logits, cache = forward_with_cache(CONFIG, placed, *rows, cache_sites=[SITE])
            out["forward"].setdefault(name, []).append({
                "resid_shard": list(cache[SITE].addressable_shards[0].data.shape),
                "max_diff": float(np.abs(np.asarray(logits) - reference).max())})
            sharded = p.shard_params(params, logical_axes(CONFIG))
            result = run_sweep(CONFIG, sharded, ids, mask, targets, grid, partitioner=p, prefix_sharing=False,
                               progress=False)
            out["sweep"].setdefault(name, []).append(bool(np.array_equal(result.ranks, plain.ranks)))
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
