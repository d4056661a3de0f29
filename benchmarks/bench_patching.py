"""The reference's stage sweep, timed three ways on a 24-layer random checkpoint.

Workload (as `eval_patching_single_combis.py`): 3 components x 3 stages x {zero, mean} = 18 configs,
each applied to every query, mean cache over the same queries, rank of each query's target in the full
vocabulary. Measured in ONE run, so the ratios compare like with like:

  (a) genir-jax: `run_stage_patching` (one vmapped, jitted sweep; encoder shared by all configs);
  (b) genir-jax, one config at a time: a Python loop over configs, each a jitted batched forward;
  (c) TransformerLens `TransformerBridge` (its current release, from benchmarks/requirements.txt):
      one `run_with_hooks` per (config, query), as the reference scripts do. Skipped if not installed.

Reported: config-queries per second (steady state), end-to-end time (load + compile + sweep; for
TransformerLens load + sweep), compile time separately, and the sweep's achieved FLOP rate (XLA's cost
analysis of the compiled sweep) as a fraction of a plain float32 matmul's rate measured here.
Correctness: the ranks of (b) and (c) are checked against (a) on the queries they share.

    pip install -r benchmarks/requirements.txt      # for (c)
    python benchmarks/bench_patching.py [--queries 256] [--tl-queries 12]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import genir_jax as gj
from genir_jax.analysis.stage_patching import REFERENCE_ROW_ORDER, run_stage_patching, stage_configs
from genir_jax.interp.interventions import mean_activations
from genir_jax.interp.patching import default_query_chunk, ranks_of_targets
from genir_jax.core.sites import COMPONENT_SITES

STAGES = [list(range(0, 7)), list(range(7, 18)), list(range(18, 24))]


def build_checkpoint(directory: str, d_model: int, d_ff: int, heads: int) -> gj.PretrainedModel:
    config = gj.t5_v1_0(vocab_size=32128, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=24,
                               num_heads=heads, dropout_rate=0.0)
    model = gj.PretrainedModel(config=config, params=gj.init_params(config, 0))
    gj.save_pretrained(directory, model)
    return model


def make_queries(config, params, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 21, size=count)
    ids = np.zeros((count, lengths.max()), np.int32)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(3, 32000, size=length)
        ids[row, length - 1] = 1
        mask[row, :length] = 1
    logits = np.asarray(gj.forward(config, params, ids, mask, np.zeros((count, 1), np.int32)))[:, 0]
    return ids, mask, logits.argmax(-1).astype(np.int32)  # targets at rank 0, as correct queries are


def timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out) if not isinstance(out, (np.ndarray, type(None))) else None
    return out, time.perf_counter() - start


def ours_sweep(config, params, ids, mask, targets, chunk):
    return run_stage_patching(config, params, ids, mask, targets, stages=STAGES, modes=("mean", "zero"),
                              query_chunk=chunk, progress=False)


def ours_loop(config, params, ids, mask, targets):
    """One config at a time: the same interventions, one jitted batched forward per config."""
    means = mean_activations(config, params, ids, mask,
                             [f"decoder.*.{COMPONENT_SITES[c]}" for c in REFERENCE_ROW_ORDER],
                             progress=False)
    sweep, rows = stage_configs(config, STAGES, ("mean", "zero"), means)
    forward = jax.jit(gj.forward, static_argnums=0)
    dec = jnp.zeros((len(ids), 1), jnp.int32)
    ranks = []
    for k in range(len(rows)):
        # every term in every config (inactive ones with a zero mask): one pytree structure, one compilation
        per_config = {}
        for term in sorted(sweep.terms, key=lambda t: t.order):
            patch_mask = term.table[max(int(term.row[k]), 0)] * float(term.row[k] >= 0)
            sites = per_config.setdefault(term.stack, {})
            sites[term.local] = sites.get(term.local, ()) + (gj.Patch(patch_mask, term.value),)
        logits = forward(config, params, ids, mask, dec, None, per_config)[:, 0]
        ranks.append(np.stack([np.asarray(x) for x in ranks_of_targets(logits, targets)]))
    return np.stack(ranks)  # [K, 2, N]: ranks and target logits


def transformer_lens_sweep(directory, ids, mask, targets):
    """The reference's loop with TransformerLens' TransformerBridge: mean cache, then one
    run_with_hooks per (config, query)."""
    import torch
    from transformer_lens.model_bridge.bridge import TransformerBridge

    torch.set_grad_enabled(False)
    start = time.perf_counter()
    bridge = TransformerBridge.boot_transformers(directory, device="cpu")
    load_s = time.perf_counter() - start
    hook = {"attn": "self_attn", "cross_attn": "cross_attn", "mlp": "mlp"}
    names = [f"decoder_blocks.{l}.{hook[c]}.hook_out" for c in REFERENCE_ROW_ORDER for l in range(24)]
    decoder_input = torch.zeros((1, 1), dtype=torch.long)
    queries = [torch.as_tensor(ids[i:i + 1, : int(mask[i].sum())], dtype=torch.long) for i in range(len(ids))]
    start = time.perf_counter()
    sums = {}
    for tokens in queries:  # the mean cache, one query at a time
        _, cache = bridge.run_with_cache(tokens, decoder_input=decoder_input, names_filter=lambda n: n in names)
        for name in names:
            sums[name] = sums.get(name, 0) + cache[name][0]
    means = {name: value / len(queries) for name, value in sums.items()}
    ranks = []
    for mode in ("mean", "zero"):
        for component in REFERENCE_ROW_ORDER:
            for stage in STAGES:
                def patch(activation, hook, mode=mode):
                    if mode == "zero":
                        return torch.zeros_like(activation)
                    activation[0, 0] = means[hook.name][0]
                    return activation
                hooks = [(f"decoder_blocks.{l}.{hook[component]}.hook_out", patch) for l in stage]
                row = []
                for tokens, target in zip(queries, targets):
                    logits = bridge.run_with_hooks(tokens, decoder_input=decoder_input, fwd_hooks=hooks)[0, 0]
                    row.append(int(torch.argsort(torch.argsort(logits, descending=True))[int(target)]))
                ranks.append(row)
    return np.asarray(ranks), load_s, time.perf_counter() - start


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), np.float32))
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        dot(a, a).block_until_ready()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def sweep_flops(config, mask, configs: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of the genir-jax sweep as run: the mean pass (encoder + decoder, no
    unembedding) and the sweep (encoder and cross-attention keys/values once per query; decoder step and
    unembedding once per config and query). Sequences count at their padded chunk length. XLA's own cost
    analysis counts a scanned layer once, not once per layer, so it is not used."""
    d, inner, f, v = config.d_model, config.inner_dim, config.d_ff, config.vocab_size
    mlp = (3 if config.is_gated_act else 2) * d * f
    s = mask.shape[1]
    queries = mask.shape[0]
    encoder_token = 4 * d * inner + 2 * s * inner + mlp           # projections, attention, MLP (MACs)
    encoder = queries * s * encoder_token * config.num_layers
    cross_kv = queries * s * 2 * d * inner * config.num_decoder_layers
    decoder_step = (4 * d * inner + 2 * d * inner + 2 * s * inner + mlp) * config.num_decoder_layers
    means = encoder + cross_kv + queries * decoder_step
    sweep = encoder + cross_kv + queries * configs * (decoder_step + d * v)
    return 2.0 * (means + sweep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=256, help="queries for genir-jax (a) and (b)")
    parser.add_argument("--tl-queries", type=int, default=12, help="queries for TransformerLens (c); 0 skips it")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=None, help="queries per device per sweep step")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(tmp, "t5-24l")
        build_checkpoint(directory, args.d_model, args.d_ff, args.heads)
        start = time.perf_counter()
        model = gj.load_pretrained(directory)
        load_s = time.perf_counter() - start
        config, params = model.config, model.params
        ids, mask, targets = make_queries(config, params, args.queries)
        chunk = args.chunk or min(default_query_chunk(18, config.vocab_size), args.queries)
        configs = 18

        first, first_s = timed(lambda: ours_sweep(config, params, ids, mask, targets, chunk))
        second, steady_s = timed(lambda: ours_sweep(config, params, ids, mask, targets, chunk))
        compile_s = max(0.0, first_s - steady_s)
        loop_first, loop_first_s = timed(lambda: ours_loop(config, params, ids, mask, targets))
        loop_ranks, loop_s = timed(lambda: ours_loop(config, params, ids, mask, targets))
        # Same computation, other batch shapes: float32 rounding differs, so near-tied logits may swap.
        same_ranks = float(np.mean(loop_ranks[:, 0] == second.ranks))
        logit_gap = float(np.abs(loop_ranks[:, 1] - second.sweep.target_logits).max())
        if logit_gap > 1e-3:
            raise SystemExit(f"the one-config loop disagrees with the sweep: target logits differ by {logit_gap}")
        flops = sweep_flops(config, mask, configs)
        matmul = matmul_gflops()

        rows = [("(a) genir-jax sweep", configs * args.queries / steady_s, load_s + first_s, compile_s),
                ("(b) genir-jax one config at a time", configs * args.queries / loop_s, load_s + loop_first_s,
                 max(0.0, loop_first_s - loop_s))]
        tl = None
        if args.tl_queries:
            try:
                tl_ranks, tl_load_s, tl_s = transformer_lens_sweep(directory, ids[:args.tl_queries],
                                                                   mask[:args.tl_queries], targets[:args.tl_queries])
                subset = slice(0, args.tl_queries)  # means are over the queries run, so compare like with like
                same = ours_sweep(config, params, ids[subset], mask[subset], targets[subset], chunk)
                agree = np.array_equal(tl_ranks, same.ranks)
                tl = (configs * args.tl_queries / tl_s, tl_load_s, tl_s, agree)
                rows.append(("(c) TransformerLens TransformerBridge", tl[0], tl_load_s + tl_s, 0.0))
            except ImportError as exc:
                print(f"TransformerLens not installed ({exc}); pip install -r benchmarks/requirements.txt")

    print(f"\nmodel: 24+24 layers, d_model {args.d_model}, d_ff {args.d_ff}, {args.heads} heads, vocab 32128; "
          f"{configs} configs; devices: {jax.devices()}")
    print(f"queries: (a)/(b) {args.queries}, (c) {args.tl_queries}; sweep chunk {chunk} queries/device")
    print(f"{'method':<40} {'config-queries/s':>17} {'end-to-end s':>13} {'compile s':>10}")
    for name, rate, total, compile_time in rows:
        print(f"{name:<40} {rate:17.1f} {total:13.2f} {compile_time:10.2f}")
    achieved = flops / steady_s / 1e9
    print(f"\n(b) vs (a): {same_ranks:.2%} of ranks identical, target logits within {logit_gap:.1e}")
    print(f"sweep FLOP rate (means + sweep, {flops / 1e9:.0f} GFLOP): {achieved:.1f} GFLOP/s = "
          f"{achieved / matmul:.0%} of a plain float32 matmul "
          f"({matmul:.1f} GFLOP/s, 2048x2048)")
    if tl:
        rate_a = rows[0][1]
        # end-to-end at equal query counts: TransformerLens' load time plus its sweep (mean cache included)
        # scaled linearly from its queries to ours (it runs one query at a time)
        tl_end_to_end = tl[1] + tl[2] * args.queries / args.tl_queries
        print(f"steady state: genir-jax sweep is {rate_a / tl[0]:.1f}x TransformerLens "
              f"(one-config loop: {rows[1][1] / tl[0]:.1f}x)")
        print(f"end-to-end for {args.queries} queries: genir-jax {rows[0][2]:.1f} s vs TransformerLens "
              f"{tl_end_to_end:.1f} s (its rate extrapolated) = {tl_end_to_end / rows[0][2]:.1f}x")
        print(f"TransformerLens ranks equal ours on its {args.tl_queries} queries: {tl[3]}")


if __name__ == "__main__":
    main()
