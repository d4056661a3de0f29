"""TransformerLens loops for a decoder-only neuron zero-ablation sweep (the peer of `bench_decoder_sweep.py`).

Run in its own interpreter (a venv with TransformerLens 2.x, whose `HookedTransformer` it uses, torch and
transformers; genir-jax is not needed there):

    python benchmarks/tl_decoder_loops.py SPEC.json OUT.json

It loads the GPT-2 checkpoint directory of SPEC (written by genir-jax's `save_decoder_only`) with transformers
(eager attention), converts its weights to a `HookedTransformer` built from a hand-made
`HookedTransformerConfig` (no LayerNorm folding, no centring: the same function as transformers'), checks its
logits equal transformers' on every query (fails otherwise), then times these loops, each zeroing one MLP
neuron at ``blocks.{l}.mlp.hook_post`` (every position) per configuration and ranking each query's target at
its last real token over the whole vocabulary (ties: lower id first, as genir-jax):

- ``reference``: one ``run_with_hooks`` per (configuration, query), unpadded, as the reference scripts loop;
- ``batched``: all queries in one right-padded ``run_with_hooks`` per configuration (GPT-2's positions are
  absolute and attention causal, so a real token never sees the padding on its right: no mask needed and the
  logits at the last real token are the unpadded ones);
- ``cached``: the residual stream before every layer cached once from a clean batched run; a configuration
  at layer l runs ``run_with_hooks(resid_pre[l], start_at_layer=l, stop_at_layer=n_layers)`` and unembeds
  only each row's last real position (`ln_final` + `unembed`);
- ``cached_configs_batched``: as ``cached``, with C configurations of one layer in one batch of C x Q rows,
  the hook zeroing a different neuron in each block of Q rows (the smartest of the four).

SPEC: ``{"checkpoint", "queries" [[ids...]], "targets" [...], "pairs" [[layer, neuron], ...],
"reference_queries", "threads", "configs_per_batch", "loops" [...]}``. OUT: per loop ``{"seconds",
"config_queries", "ranks", "logits"}`` (ranks/logits [pairs][queries the loop ran]), the load time, the
logit check, the versions and thread count.
"""

from __future__ import annotations

import json
import sys
import time

LOOPS = ("reference", "batched", "cached", "cached_configs_batched")


def main(spec_path: str, out_path: str) -> None:
    import torch
    import transformer_lens
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import GPT2LMHeadModel

    try:
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    except ImportError:  # older 2.x layout
        from transformer_lens.loading_from_pretrained import convert_gpt2_weights

    with open(spec_path) as handle:
        spec = json.load(handle)
    torch.set_num_threads(int(spec.get("threads", 2)))
    torch.set_grad_enabled(False)
    began = time.perf_counter()
    hf = GPT2LMHeadModel.from_pretrained(spec["checkpoint"], attn_implementation="eager").eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, act_fn=c.activation_function, eps=c.layer_norm_epsilon,
        normalization_type="LN", positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, device="cpu", dtype=torch.float32)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False,
                                      refactor_factored_attn_matrices=False)
    model.eval()
    load_s = time.perf_counter() - began

    queries = [torch.tensor(q, dtype=torch.long) for q in spec["queries"]]
    n = len(queries)
    lengths = torch.tensor([len(q) for q in queries])
    last = lengths - 1
    padded = torch.zeros((n, int(lengths.max())), dtype=torch.long)
    for row, q in enumerate(queries):
        padded[row, : len(q)] = q
    targets = torch.tensor(spec["targets"], dtype=torch.long)
    rows = torch.arange(n)
    vocab = torch.arange(cfg.d_vocab)
    pairs = [tuple(p) for p in spec["pairs"]]
    L = cfg.n_layers

    def ranks_of(logits, rows_targets):  # logits [R, V] -> ranks [R], target logits [R]
        target = logits.gather(1, rows_targets[:, None])
        ahead = (logits > target) | ((logits == target) & (vocab[None, :] < rows_targets[:, None]))
        return ahead.sum(1), target[:, 0]

    # the logit check: TL equals transformers on every query (unpadded), and right padding changes nothing
    mask = (torch.arange(padded.shape[1])[None] < lengths[:, None]).long()
    hf_last = hf(input_ids=padded, attention_mask=mask).logits[rows, last]
    tl_last = model(padded)[rows, last]
    tl_single = torch.stack([model(q[None])[0, -1] for q in queries])
    check = {"max_abs_tl_vs_transformers": float((tl_last - hf_last).abs().max()),
             "max_abs_padded_vs_unpadded": float((tl_last - tl_single).abs().max()),
             "max_abs_logit": float(hf_last.abs().max())}
    if not (torch.allclose(tl_last, hf_last, atol=1e-4, rtol=1e-4) and torch.allclose(tl_last, tl_single, atol=1e-4)):
        raise SystemExit(f"TransformerLens' logits differ from transformers': {check}")
    clean_ranks, clean_logits = ranks_of(tl_last, targets)

    def zero_one(neuron):
        def hook(act, hook):
            act[..., neuron] = 0.0
            return act
        return hook

    def zero_per_row(neurons_by_row):
        def hook(act, hook):
            act[torch.arange(act.shape[0]), :, neurons_by_row] = 0.0
            return act
        return hook

    def site(layer):
        return f"blocks.{layer}.mlp.hook_post"

    def reference(pairs):
        count = int(spec.get("reference_queries", n))
        out = []
        for layer, neuron in pairs:
            logits = torch.stack([model.run_with_hooks(queries[q][None], fwd_hooks=[(site(layer), zero_one(neuron))])[0, -1]
                                  for q in range(count)])
            out.append(ranks_of(logits, targets[:count]))
        return out

    def batched(pairs):
        out = []
        for layer, neuron in pairs:
            logits = model.run_with_hooks(padded, fwd_hooks=[(site(layer), zero_one(neuron))])[rows, last]
            out.append(ranks_of(logits, targets))
        return out

    resid = {}

    def resid_pre():
        if not resid:
            _, cache = model.run_with_cache(padded, names_filter=lambda name: name.endswith("hook_resid_pre"))
            resid.update({layer: cache[f"blocks.{layer}.hook_resid_pre"] for layer in range(L)})
        return resid

    def from_layer(layer, residual, hook, last_rows, last_positions):
        final = model.run_with_hooks(residual, start_at_layer=layer, stop_at_layer=L, fwd_hooks=[(site(layer), hook)])
        return model.unembed(model.ln_final(final[last_rows, last_positions][:, None]))[:, 0]

    def cached(pairs):
        cache = resid_pre()
        return [ranks_of(from_layer(layer, cache[layer], zero_one(neuron), rows, last), targets)
                for layer, neuron in pairs]

    def cached_configs_batched(pairs):
        cache = resid_pre()
        per_batch = int(spec.get("configs_per_batch", 16))
        by_layer: dict[int, list[int]] = {}
        for index, (layer, _) in enumerate(pairs):
            by_layer.setdefault(layer, []).append(index)
        out = {}
        for layer, indices in by_layer.items():
            for first in range(0, len(indices), per_batch):
                chunk = indices[first:first + per_batch]
                count = len(chunk)
                neurons = torch.tensor([pairs[i][1] for i in chunk]).repeat_interleave(n)
                logits = from_layer(layer, cache[layer].repeat(count, 1, 1), zero_per_row(neurons),
                                    torch.arange(count * n), last.repeat(count))
                ranks, target_logits = ranks_of(logits, targets.repeat(count))
                for j, i in enumerate(chunk):
                    out[i] = (ranks[j * n:(j + 1) * n], target_logits[j * n:(j + 1) * n])
        return [out[i] for i in range(len(pairs))]

    loops = {"reference": reference, "batched": batched, "cached": cached,
             "cached_configs_batched": cached_configs_batched}
    results = {"load_s": load_s, "logit_check": check, "clean_ranks": clean_ranks.tolist(),
               "clean_logits": clean_logits.tolist(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "transformer_lens": getattr(transformer_lens, "__version__", None) or _version("transformer-lens"),
               "loops": {}}
    for name in spec.get("loops", LOOPS):
        loops[name](pairs[:2])  # warm-up (one-off allocations; the residual cache for the cached loops)
        began = time.perf_counter()
        rows_out = loops[name](pairs)
        seconds = time.perf_counter() - began
        queries_run = len(rows_out[0][0])
        results["loops"][name] = {"seconds": seconds, "config_queries": len(pairs) * queries_run,
                                  "queries": queries_run, "ranks": [r.tolist() for r, _ in rows_out],
                                  "logits": [l.tolist() for _, l in rows_out]}
        print(f"{name}: {len(pairs) * queries_run / seconds:.1f} config-queries/s", file=sys.stderr, flush=True)
    with open(out_path, "w") as handle:
        json.dump(results, handle)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
