"""Compile time and steady-state forward time of the T5 core, against transformers' PyTorch T5.

Shapes are the GenIR workload: batch 32, query length 32, ONE decoder step (atomic docids).
Models: a 24+24-layer d_model-128 T5 (deep and narrow: compile time matters) and a t5-small-sized one
(6+6 layers, d_model 512). Random weights; the vocabulary is T5's 32128 rows.

    python benchmarks/bench_forward.py [--repeats 20] [--no-torch]

Prints one table; the ratio column is PyTorch time / our time, both measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import genir_jax as gj

MODELS = {
    "24L d128": gj.t5_v1_0(vocab_size=32128, d_model=128, d_kv=32, d_ff=512, num_layers=24, num_heads=4,
                                  dropout_rate=0.0),
    "t5-small (6L d512)": gj.t5_v1_0(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                                            num_heads=8, dropout_rate=0.0),
}


def _inputs(batch: int, length: int, vocab: int):
    rng = np.random.default_rng(0)
    ids = rng.integers(2, vocab, size=(batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    return ids, mask, np.zeros((batch, 1), dtype=np.int32)


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_ours(config, batch, length, repeats):
    params = jax.device_put(gj.init_params(config, 0))
    ids, mask, dec = (jnp.asarray(a) for a in _inputs(batch, length, config.vocab_size))
    forward = jax.jit(gj.forward, static_argnums=0)
    start = time.perf_counter()
    compiled = forward.lower(config, params, ids, mask, dec).compile()
    compile_s = time.perf_counter() - start
    compiled(params, ids, mask, dec).block_until_ready()
    steady = _time(lambda: compiled(params, ids, mask, dec).block_until_ready(), repeats)
    return compile_s, steady


def bench_torch(config, batch, length, repeats):
    import torch
    from transformers import T5Config as HFConfig, T5ForConditionalGeneration

    hf = HFConfig(**config.to_hf_dict())
    model = T5ForConditionalGeneration(hf).eval()
    ids, mask, dec = (torch.as_tensor(a, dtype=torch.long) for a in _inputs(batch, length, config.vocab_size))
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        return _time(lambda: model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers PyTorch baseline")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}; batch {args.batch}, query length {args.length}, 1 decoder step")
    print(f"{'model':<20} {'compile s':>10} {'ours ms':>9} {'torch ms':>9} {'torch/ours':>10}")
    for name, config in MODELS.items():
        compile_s, ours = bench_ours(config, args.batch, args.length, args.repeats)
        theirs = None if args.no_torch else bench_torch(config, args.batch, args.length, args.repeats)
        ratio = f"{theirs / ours:10.2f}" if theirs else f"{'-':>10}"
        theirs_ms = f"{theirs * 1e3:9.1f}" if theirs else f"{'-':>9}"
        print(f"{name:<20} {compile_s:10.2f} {ours * 1e3:9.1f} {theirs_ms} {ratio}")


if __name__ == "__main__":
    main()
