"""Large sweeps on a 24+24-layer random T5: exact neuron sweep, prefix sharing, TransformerLens, AtP / AtP*.

Model: T5 v1.0, 24 encoder + 24 decoder layers, d_model 128, 4 heads (d_kv 32), d_ff 512, vocab 32128,
random weights (as benchmarks/bench_patching.py builds it); N queries whose targets are the clean top token.
Measured in ONE run (so rates compare like with like):

  1. exact zero-ablation sweep of every decoder MLP neuron (site_grid "decoder.*.mlp.hook_post",
     unit="neuron": 24 x 512 = 12,288 configs) on N queries, metrics (rank, logit), per_query=False:
     end-to-end time (compile included), steady config-queries/s, achieved FLOP/s (analytic count, see
     `neuron_sweep_flops`) against a plain jitted float32 matmul measured here;
  1b. the rank window (`genir_jax.interp.rank_window`): every 4th neuron with rank_window=0 vs the default, warm,
     ranks compared;
  2. prefix sharing: every 8th neuron with prefix_sharing=False vs True;
  3a. the PyTorch loops a capable user writes (`benchmarks/torch_baselines.py`, own interpreter, thread count
     stated): batched hooks, encoder cached, configurations batched; on a sample of configs with all N
     queries, ranks checked against ours, every ratio against the fastest of the three first. A load check
     (/proc/stat) before the run: on a busy machine the ratios are not reported (``--allow-busy`` overrides);
  3. TransformerLens 2.x HookedEncoderDecoder (run in its own interpreter, --tl-python): one
     run_with_hooks per (config, query) zeroing one neuron on decoder.{l}.mlp.hook_post, timed on a sample
     and extrapolated to 12,288 x N; its ranks are checked against ours on the sampled pairs;
  4. AtP* and AtP for all 12,288 neurons (metric logit): wall time vs the exact sweep;
  5. attribution vs exact: Spearman of the exact mean logit effect vs AtP / AtP* per head (self and
     cross attention), per layer x component, per neuron; top-100 overlap for neurons;
  6. peak RSS of the neuron sweep for 12,288 and 98,304 configs (8 copies via sweep.concat) on 8
     queries with the same chunk sizes, each in its own subprocess.

    python benchmarks/bench_sweeps.py [--queries 200] [--skip-tl] [--skip-attribution] [--json out.json]
        [--torch-configs 48] [--torch-threads 2] [--allow-busy]
        [--tl-python /tmp/tl-venv/bin/python]   # a venv with transformer-lens>=2.15,<3 and torch
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

import genir_jax as gj
from genir_jax.interp.attribution import attribute, spearman, top_overlap
from genir_jax.interp.patching import default_config_chunk, run_sweep
from genir_jax.interp.sweep import component_grid, concat, site_grid
from genir_jax.core.sites import site_name

from bench_patching import make_queries, matmul_gflops  # noqa: E402 (benchmarks/ is on sys.path when run as a script)
from torch_baselines import loadavg, log, machine_is_idle, run_baselines  # noqa: E402

LAYERS, D_MODEL, HEADS, D_FF, VOCAB = 24, 128, 4, 512, 32128
NEURONS = "decoder.*.mlp.hook_post"


def build_model(d_ff: int = D_FF) -> gj.PretrainedModel:
    config = gj.t5_v1_0(vocab_size=VOCAB, d_model=D_MODEL, d_kv=D_MODEL // HEADS, d_ff=d_ff,
                               num_layers=LAYERS, num_heads=HEADS, dropout_rate=0.0)
    return gj.PretrainedModel(config=config, params=gj.init_params(config, 0))


def layer_macs(config, s: int) -> int:
    """MACs of one decoder layer for one decoder token (cross-attention keys/values excluded). The
    self-attention over its one position is its value and output projections alone (the softmax over one key
    is 1: `MultiHeadAttention` computes no queries, keys or scores there); cross-attention: the query and
    output projections and the scores and weighted sum over the `s` encoder positions."""
    d, inner, f = config.d_model, config.inner_dim, config.d_ff
    mlp = (3 if config.is_gated_act else 2) * d * f
    return 2 * d * inner + 2 * d * inner + 2 * s * inner + mlp


def minimum_neuron_patch_flops(config, s: int, starts: np.ndarray, window: int) -> float:
    """Mean FLOPs per config-query that any exact zero-ablation of one decoder MLP neuron needs, given the
    clean run (encoder output, cross-attention keys/values, residual stream before the neuron's layer)
    computed once per query: the rank-1 update of the neuron's layer output (``out - a_n * W_out[n]``, d
    MACs), every later decoder layer for the one decoder token (`layer_macs`), and the final norm and the
    logits of the `window` tokens the rank window ranks from (d MACs each)."""
    d, layers = config.d_model, config.num_decoder_layers
    starts = np.asarray(starts)
    later_layers = (layers - 1 - starts).astype(np.float64)
    return float(2.0 * np.mean(d + later_layers * layer_macs(config, s) + d * window))


def torch_encoder_cached_flops(config, s: int) -> float:
    """FLOPs per config-query of the encoder-cached PyTorch loop (`torch_baselines.encoder_cached`): transformers'
    T5 decoder for its one token through every layer, self-attention with its query, key, value and output
    projections and its scores over one key, cross-attention keys and values recomputed from the cached encoder
    output over the `s` positions (no cache is passed) with its scores and weighted sum, the MLP, and the full
    unembedding. The encoder (once per query) is left out, which favours the loop. Matmuls only, as
    `torch.utils.flop_counter` counts them."""
    d, inner, v = config.d_model, config.inner_dim, config.vocab_size
    # what `layer_macs` counts, plus the self-attention's query and key projections and its scores over one key,
    # plus the cross-attention keys and values the loop recomputes
    layer = layer_macs(config, s) + 2 * d * inner + 2 * inner + 2 * s * d * inner
    return 2.0 * (config.num_decoder_layers * layer + d * v)


def exact_ratio_bound(matmul_flops_per_s: float, minimum_flops: float, baseline_cq_per_s: float) -> float:
    """The largest speed-up over a baseline that any exact method can reach on this machine: it must do at
    least `minimum_flops` per config-query and cannot run faster than a plain matmul."""
    return matmul_flops_per_s / minimum_flops / baseline_cq_per_s


def neuron_sweep_flops(config, s: int, queries_executed: int, query_chunk: int, config_chunk: int,
                       starts: np.ndarray, prefix_sharing: bool = True, window: int = 0, full_rows: int = 0) -> dict:
    """Matmul FLOPs (2 per MAC) executed by run_sweep on a single-site neuron sweep, padding included.

    Per config and query row: decoder layers start..L-1 (one token; start = the neuron's layer with prefix
    sharing, 0 without) and the unembedding: d x V, or with a rank window (`window` tokens, run_sweep's
    ``stats["rank_window"]``) d x window plus d x V for each of the `full_rows` rows ranked over the whole
    vocabulary (``stats["rank_rows_full_vocabulary"]``). Per (config chunk, query chunk) call: cross-attention
    keys/values of layers start..L-1 (unbatched over configs). Per query row once: the clean state (encoder,
    full decoder, cross K/V of every layer, unembedding). Ranking's comparisons and sorts are not counted.
    """
    d, inner, f, v, layers = config.d_model, config.inner_dim, config.d_ff, config.vocab_size, config.num_decoder_layers
    mlp = (3 if config.is_gated_act else 2) * d * f
    dec = layer_macs(config, s)
    cross_kv = s * 2 * d * inner  # per query row and layer
    encoder = s * (4 * d * inner + 2 * s * inner + mlp) * config.num_layers
    clean = queries_executed * (encoder + layers * (dec + cross_kv) + d * v)
    calls_per_block = queries_executed // query_chunk
    sweep = 0
    starts = np.asarray(starts) if prefix_sharing else np.zeros_like(starts)
    for start in np.unique(starts):
        count = int((starts == start).sum())
        executed = -(-count // config_chunk) * config_chunk
        blocks = -(-count // config_chunk)
        depth = layers - int(start)
        sweep += executed * queries_executed * (depth * dec + d * (window or v))
        sweep += blocks * calls_per_block * query_chunk * depth * cross_kv
    sweep += full_rows * d * v
    return {"flops": 2.0 * (clean + sweep), "per_config_query_flops": 2.0 * sweep / max(1, len(starts) * queries_executed)}


def near_tie(config, params, ids, mask, targets, sweep, k: int, q: int, rank_a: int, rank_b: int) -> dict:
    """A rank two computations disagree on: the config's logits from one plain forward, and the gap between
    the target's logit and the closest other token's (relative to the target's), to show it is a float tie."""
    layer, neuron = int(sweep.labels["layer"][k]), int(sweep.labels["neuron"][k])
    iv = gj.neuron_ablation(config, {site_name("decoder", "mlp", layer): [neuron]})
    logits = np.asarray(gj.forward(config, params, ids[q:q + 1], mask[q:q + 1], np.zeros((1, 1), np.int32),
                                   interventions=iv), np.float64)[0, 0]
    target = int(targets[q])
    others = np.delete(logits, target)
    closest = int(np.argmin(np.abs(others - logits[target])))
    gap = float(np.abs(others[closest] - logits[target]) / max(1.0, abs(logits[target])))
    return {"config": k, "query": q, "layer": layer, "neuron": neuron, "ranks": [rank_a, rank_b],
            "closest_relative_gap": gap}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# TransformerLens (its own interpreter)
# --------------------------------------------------------------------------------------------------

TL_SCRIPT = r"""
import json, sys, time
import torch
from transformers import AutoModelForSeq2SeqLM
from transformer_lens import HookedEncoderDecoder
from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES
import transformer_lens
torch.set_grad_enabled(False)
spec = json.load(open(sys.argv[1]))
checkpoint = spec["checkpoint"]
start = time.perf_counter()
OFFICIAL_MODEL_NAMES.append(checkpoint)
# the random checkpoint has no tokenizer and the sweep passes token ids, so give TL a stand-in (only stored)
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast
stand_in = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2},
                                                                        unk_token="<unk>")),
                                   pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
model = HookedEncoderDecoder.from_pretrained(checkpoint, hf_model=AutoModelForSeq2SeqLM.from_pretrained(checkpoint),
                                             device="cpu", tokenizer=stand_in)
model.eval()
assert model.cfg.d_vocab == 32128, model.cfg.d_vocab
load_s = time.perf_counter() - start
decoder_input = torch.zeros((1, 1), dtype=torch.long)
queries = [torch.tensor([q], dtype=torch.long) for q in spec["queries"]]
targets = spec["targets"]
vocab = torch.arange(model.cfg.d_vocab)

def rank_of(logits, target):
    t = logits[target]
    return int(((logits > t) | ((logits == t) & (vocab < target))).sum()), float(t)

def run(layer, neuron, q):
    def hook(act, hook):
        act[..., neuron] = 0.0
        return act
    logits = model.run_with_hooks(queries[q], decoder_input=decoder_input,
                                  fwd_hooks=[(f"decoder.{layer}.mlp.hook_post", hook)])[0, 0]
    return rank_of(logits, targets[q])

for layer, neuron in spec["pairs"][:2]:  # warm-up
    run(layer, neuron, 0)
clean = [rank_of(model(q, decoder_input=decoder_input)[0, 0], t) for q, t in zip(queries, targets)]
start = time.perf_counter()
ranks, logits = [], []
for layer, neuron in spec["pairs"]:
    row = [run(layer, neuron, q) for q in range(len(queries))]
    ranks.append([r for r, _ in row]); logits.append([l for _, l in row])
loop_s = time.perf_counter() - start
json.dump({"load_s": load_s, "loop_s": loop_s, "ranks": ranks, "logits": logits, "clean": clean,
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "transformer_lens": getattr(transformer_lens, "__version__", "?")}, open(sys.argv[2], "w"))
"""


def transformer_lens_sample(tl_python: str, directory: str, ids, mask, targets, pairs) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"checkpoint": directory, "targets": [int(t) for t in targets], "pairs": [list(map(int, p)) for p in pairs],
                "queries": [row[: int(m.sum())].tolist() for row, m in zip(ids, mask)]}
        with open(os.path.join(tmp, "spec.json"), "w") as handle:
            json.dump(spec, handle)
        script = os.path.join(tmp, "tl.py")
        with open(script, "w") as handle:
            handle.write(TL_SCRIPT)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("PYTHONPATH", None)
        result = subprocess.run([tl_python, script, os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")],
                                capture_output=True, text=True, env=env, cwd=tmp)
        if result.returncode != 0:
            raise RuntimeError(f"TransformerLens run failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        with open(os.path.join(tmp, "out.json")) as handle:
            return json.load(handle)


# --------------------------------------------------------------------------------------------------
# Memory child
# --------------------------------------------------------------------------------------------------

def memory_child(copies: int, queries: int, query_chunk: int, config_chunk: int) -> None:
    model = build_model()
    config, params = model.config, model.params
    ids, mask, targets = make_queries(config, params, queries)
    grid = site_grid(config, NEURONS, unit="neuron")
    sweep = grid if copies == 1 else concat(*([grid] * copies))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, seconds = timed(lambda: run_sweep(config, params, ids, mask, targets, sweep, metrics=("rank", "logit"),
                                              per_query=False, query_chunk=query_chunk, config_chunk=config_chunk,
                                              progress=False))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("MEMORY-RESULT " + json.dumps({"configs": sweep.size, "queries": queries, "peak_rss_mib": peak / 1024,
                                         "rss_before_sweep_mib": before / 1024, "seconds": seconds,
                                         "blocks": result.stats["blocks"],
                                         "mean_logit_effect": float(result.aggregates["logit_effect"].mean())}))


def memory_run(copies: int, queries: int, query_chunk: int, config_chunk: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", str(copies), "--queries", str(queries),
               "--query-chunk", str(query_chunk), "--config-chunk", str(config_chunk)]
    result = subprocess.run(command, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("MEMORY-RESULT "):
            return json.loads(line[len("MEMORY-RESULT "):])
    raise RuntimeError(f"memory child failed (exit {result.returncode}):\n{result.stderr[-3000:]}")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def window_and_prefix_sharing(out, config, params, ids, mask, targets, grid, sweep_kwargs, qc, cc, s,
                              executed_rows) -> None:
    """Parts 1b (the rank window, off vs on) and 2 (prefix sharing, off vs on), into `out`."""
    n = len(ids)
    # 1b. the rank window --------------------------------------------------------------------------------------
    subset = grid.take(np.arange(0, grid.size, 4))
    log(f"1b. rank window on every 4th neuron ({subset.size} configs x {n} queries): off vs on (warm)")
    run_sweep(config, params, ids[:qc], mask[:qc], targets[:qc], subset.take(np.arange(cc)), rank_window=0,
              **sweep_kwargs)  # compile
    full_vocab, full_vocab_s = timed(lambda: run_sweep(config, params, ids, mask, targets, subset, rank_window=0,
                                                       **dict(sweep_kwargs, per_query=True, top_k=0)))
    windowed, windowed_s = timed(lambda: run_sweep(config, params, ids, mask, targets, subset,
                                                   **dict(sweep_kwargs, per_query=True, top_k=0)))
    differing = np.argwhere(full_vocab.values["rank"] != windowed.values["rank"])
    out["rank_window_differences"] = [near_tie(config, params, ids, mask, targets, subset, int(k), int(q),
                                               int(full_vocab.values["rank"][k, q]), int(windowed.values["rank"][k, q]))
                                      for k, q in differing[:20]]
    out["rank_window"] = {"configs": subset.size, "off_s": full_vocab_s, "on_s": windowed_s,
                          "speedup": full_vocab_s / windowed_s, "window": windowed.stats["rank_window"],
                          "rows_decided": windowed.stats["rank_rows_decided"],
                          "rows_full_vocabulary": windowed.stats["rank_rows_full_vocabulary"],
                          "ranks_equal": bool(np.array_equal(full_vocab.values["rank"], windowed.values["rank"])),
                          "ranks_differing": int(np.sum(full_vocab.values["rank"] != windowed.values["rank"]))}
    log(f"   off {full_vocab_s:.1f} s, on {windowed_s:.1f} s: {full_vocab_s / windowed_s:.2f}x; "
        f"{windowed.stats['rank_rows_decided']:.1%} of ranks decided by the bound; ranks equal: "
        f"{out['rank_window']['ranks_equal']} ({len(differing)} differ: {out['rank_window_differences']})")

    # 2. prefix sharing -------------------------------------------------------------------------------------
    subset = grid.take(np.arange(0, grid.size, 8))
    # 64 configs per layer: a config chunk of 64 so that neither run pads its blocks (each start layer is
    # its own block with prefix sharing; a larger chunk would be padded to full size per start layer)
    subset_kwargs = dict(sweep_kwargs, config_chunk=64)
    log(f"2. prefix sharing on every 8th neuron ({subset.size} configs x {n} queries, config chunk 64)")
    run_sweep(config, params, ids[:qc], mask[:qc], targets[:qc], subset.take(np.arange(64)), **subset_kwargs)  # compile
    shared, shared_s = timed(lambda: run_sweep(config, params, ids, mask, targets, subset, **subset_kwargs))
    unshared, unshared_s = timed(lambda: run_sweep(config, params, ids, mask, targets, subset, prefix_sharing=False,
                                                   **subset_kwargs))
    same = float(np.abs(shared.aggregates["logit_effect"] - unshared.aggregates["logit_effect"]).max())
    flops_shared = neuron_sweep_flops(config, s, executed_rows, qc, 64, subset.labels["layer"])["flops"]
    flops_unshared = neuron_sweep_flops(config, s, executed_rows, qc, 64, subset.labels["layer"], False)["flops"]
    out["prefix_sharing"] = {"configs": subset.size, "shared_s": shared_s, "unshared_s": unshared_s,
                             "speedup": unshared_s / shared_s, "analytic_flop_ratio": flops_unshared / flops_shared,
                             "max_abs_logit_effect_diff": same,
                             "layers_skipped_fraction": shared.stats["decoder_layers_skipped_fraction"]}
    log(f"   shared {shared_s:.1f} s, unshared {unshared_s:.1f} s: {unshared_s / shared_s:.2f}x "
        f"(analytic FLOP ratio {flops_unshared / flops_shared:.2f}x); logit effects agree within {same:.1e}")


def torch_loops(out, args, directory, config, params, ids, mask, targets, grid, ours_cq_per_s: float) -> None:
    """Part 3a: the three PyTorch loops (`torch_baselines`) on a sample of configs (two neurons per layer and
    more, spread evenly) with all queries; their ranks against ours; ratios against the fastest loop first."""
    if args.torch_configs <= 0:
        return
    picks = np.linspace(0, grid.size - 1, args.torch_configs).round().astype(int)
    pairs = [[int(grid.labels["layer"][k]), int(grid.labels["neuron"][k])] for k in picks]
    idle, load_line = machine_is_idle()
    log(f"3a. PyTorch loops: {len(pairs)} configs x {len(ids)} queries, torch threads {args.torch_threads}; "
        f"load check: {load_line}")
    spec = {"checkpoint": directory, "ids": np.asarray(ids).tolist(), "mask": np.asarray(mask).tolist(),
            "targets": np.asarray(targets).tolist(), "pairs": pairs, "threads": args.torch_threads,
            "configs_per_batch": 16}
    try:
        result = run_baselines(spec)
    except Exception as exc:  # report, do not hide
        out["torch_loops"] = {"error": str(exc)[-2000:]}
        log(f"   PyTorch loops failed: {str(exc)[-1500:]}")
        return
    ours = run_sweep(config, params, ids, mask, targets, grid.take(picks), metrics=("rank",), per_query=True,
                     top_k=0, progress=False)
    loops = {}
    for name in ("batched", "encoder_cached", "configs_batched"):
        ranks = np.asarray(result[name]["ranks"])
        loops[name] = {"cq_per_s": result[name]["config_queries_per_s"], "seconds": result[name]["seconds"],
                       "ranks_equal_fraction": float(np.mean(ranks == ours.ranks))}
    fastest = max(loops, key=lambda name: loops[name]["cq_per_s"])
    reportable = idle or args.allow_busy
    out["torch_loops"] = {"configs": len(pairs), "queries": len(ids), "threads": result["threads"],
                          "torch": result["torch"], "load_check": load_line, "machine_idle": idle,
                          "loops": loops, "fastest": fastest, "ours_steady_cq_per_s": ours_cq_per_s,
                          "ratios": ({name: ours_cq_per_s / loop["cq_per_s"] for name, loop in loops.items()}
                                     if reportable else None)}
    for name, loop in sorted(loops.items(), key=lambda item: -item[1]["cq_per_s"]):
        ratio = f"ours {ours_cq_per_s / loop['cq_per_s']:.1f}x" if reportable else "ratio not reported (busy)"
        log(f"   {name}: {loop['cq_per_s']:.1f} cq/s, ranks equal ours {loop['ranks_equal_fraction']:.2%}; {ratio}")
    exact = out.get("exact", {})
    if reportable and "minimum_flops_per_config_query" in exact:
        # where the limit is: the encoder-cached loop's work and rate against the least work an exact patch needs
        # at the best FLOP rate this machine showed (a plain matmul)
        cached = loops["encoder_cached"]
        torch_flops = torch_encoder_cached_flops(config, ids.shape[1])
        peak = 1e9 * max(exact["matmul_gflops_before"], exact["matmul_gflops_after"])
        bound = exact_ratio_bound(peak, exact["minimum_flops_per_config_query"], cached["cq_per_s"])
        out["torch_loops"]["encoder_cached_bound"] = {
            "torch_flops_per_config_query": torch_flops, "torch_achieved_gflops": torch_flops * cached["cq_per_s"] / 1e9,
            "largest_exact_ratio_at_matmul_peak": bound, "ours": ours_cq_per_s / cached["cq_per_s"]}
        log(f"   limit: the encoder-cached loop executes {torch_flops / 1e6:.1f} MFLOP per config-query at "
            f"{torch_flops * cached['cq_per_s'] / 1e9:.1f} GFLOP/s; an exact patch needs at least "
            f"{exact['minimum_flops_per_config_query'] / 1e6:.2f} MFLOP, so at the matmul peak ({peak / 1e9:.1f} "
            f"GFLOP/s) no exact method exceeds {bound:.1f}x it here (ours: "
            f"{ours_cq_per_s / cached['cq_per_s']:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--skip-tl", action="store_true")
    parser.add_argument("--tl-python", default="/tmp/tl-venv/bin/python")
    parser.add_argument("--tl-configs", type=int, default=30)
    parser.add_argument("--tl-queries", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--query-chunk", type=int, default=32, help="queries per sweep step")
    parser.add_argument("--config-chunk", type=int, default=None, help="configs per sweep step (default: run_sweep's)")
    parser.add_argument("--torch-configs", type=int, default=48, help="configs timed in the PyTorch loops (0: skip)")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--allow-busy", action="store_true", help="report ratios although the machine is busy")
    parser.add_argument("--skip-attribution", action="store_true", help="skip parts 1b, 2, 4 and 5")
    parser.add_argument("--memory-queries", type=int, default=8)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="run only part 6")
    parser.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.queries, args.query_chunk, args.config_chunk)
        return
    if args.memory_only:
        model = build_model()
        mq = args.memory_queries
        mcc = args.config_chunk or default_config_chunk(min(args.query_chunk, 200), VOCAB)
        log(f"6. peak RSS, {mq} queries, query chunk {mq}, config chunk {mcc} (separate processes)")
        memory = {}
        for copies in (1, 8):
            memory[str(copies * 12288)] = memory_run(copies, mq, mq, mcc)
            log(f"   {copies * 12288} configs: {memory[str(copies * 12288)]}")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"memory": memory, "loadavg_end": loadavg()}, handle, indent=2)
        return

    idle, load_line = machine_is_idle()
    out: dict = {"loadavg_start": loadavg(), "devices": str(jax.devices()), "cpu_count": os.cpu_count(),
                 "queries": args.queries, "machine_idle_at_start": idle, "load_check": load_line}
    log(f"load check: {load_line}: {'idle' if idle else 'BUSY'}")
    log(f"devices {jax.devices()}, {os.cpu_count()} CPUs")
    tmp = tempfile.TemporaryDirectory()
    directory = os.path.join(tmp.name, "t5-24l-d128")
    model = build_model()
    gj.save_pretrained(directory, model)
    (model, load_s) = timed(lambda: gj.load_pretrained(directory))
    config, params = model.config, model.params
    n = args.queries
    ids, mask, targets = make_queries(config, params, n)
    s = ids.shape[1]
    qc = min(args.query_chunk, n)
    cc = args.config_chunk or default_config_chunk(qc, config.vocab_size)
    executed_rows = -(-n // qc) * qc
    out.update(load_s=load_s, padded_length=s, query_chunk=qc, config_chunk=cc)
    log(f"model loaded in {load_s:.1f} s; {n} queries padded to {s} tokens; query chunk {qc}, config chunk {cc}")

    matmul_before = matmul_gflops()
    log(f"plain float32 matmul (2048^3, jitted): {matmul_before:.1f} GFLOP/s")

    # 1. exact neuron sweep --------------------------------------------------------------------------------
    grid = site_grid(config, NEURONS, unit="neuron")
    sweep_kwargs = dict(metrics=("rank", "logit"), per_query=False, query_chunk=qc, config_chunk=cc, progress=False)
    log(f"1. exact neuron sweep: {grid.size} configs x {n} queries (cold: compile included)")
    exact, exact_s = timed(lambda: run_sweep(config, params, ids, mask, targets, grid, **sweep_kwargs))
    log(f"   done in {exact_s:.1f} s (run_sweep stats: {exact.stats})")
    # compile time: clear the caches, run one block cold and warm with the same shapes
    jax.clear_caches()
    small = grid.take(np.arange(cc) + 23 * 512)
    _, small_cold = timed(lambda: run_sweep(config, params, ids[:qc], mask[:qc], targets[:qc], small, **sweep_kwargs))
    _, small_warm = timed(lambda: run_sweep(config, params, ids[:qc], mask[:qc], targets[:qc], small, **sweep_kwargs))
    compile_s = max(0.0, small_cold - small_warm)
    steady_s = exact_s - compile_s
    cq = grid.size * n
    starts = grid.labels["layer"]
    flops = neuron_sweep_flops(config, s, executed_rows, qc, cc, starts, window=exact.stats["rank_window"],
                               full_rows=exact.stats["rank_rows_full_vocabulary"])
    matmul_after = matmul_gflops()
    matmul = max(matmul_before, matmul_after)
    achieved = flops["flops"] / steady_s / 1e9
    minimum = minimum_neuron_patch_flops(config, s, starts, exact.stats["rank_window"])
    out["exact"] = {"configs": grid.size, "end_to_end_s": exact_s, "compile_s": compile_s, "steady_s": steady_s,
                    "minimum_flops_per_config_query": minimum,
                    "executed_over_minimum": flops["per_config_query_flops"] / minimum,
                    "steady_cq_per_s": cq / steady_s, "end_to_end_cq_per_s": cq / exact_s,
                    "flops": flops["flops"], "flops_per_config_query": flops["per_config_query_flops"],
                    "achieved_gflops": achieved, "matmul_gflops_before": matmul_before,
                    "matmul_gflops_after": matmul_after, "ratio_to_matmul": achieved / matmul, "stats": exact.stats,
                    "clean_rank0_fraction": float(np.mean(exact.clean["rank"] == 0)),
                    "configs_with_any_rank_change": int(np.sum(exact.aggregates["rank>0"] > 0))}
    log(f"   compile {compile_s:.1f} s, steady {cq / steady_s:.0f} cq/s, {achieved:.1f} GFLOP/s = "
        f"{achieved / matmul:.0%} of matmul ({matmul_before:.1f} / {matmul_after:.1f} GFLOP/s before/after)")

    if not args.skip_attribution:
        window_and_prefix_sharing(out, config, params, ids, mask, targets, grid, sweep_kwargs, qc, cc, s,
                                  executed_rows)
    torch_loops(out, args, directory, config, params, ids, mask, targets, grid, cq / steady_s)

    # 3. TransformerLens ------------------------------------------------------------------------------------
    tl = None
    if not args.skip_tl:
        rng = np.random.default_rng(1)
        picks = np.sort(rng.choice(grid.size, size=args.tl_configs, replace=False))
        pairs = [(int(grid.labels["layer"][k]), int(grid.labels["neuron"][k])) for k in picks]
        tq = min(args.tl_queries, n)
        log(f"3. TransformerLens: {len(pairs)} configs x {tq} queries, one run_with_hooks each ({args.tl_python})")
        try:
            tl = transformer_lens_sample(args.tl_python, directory, ids[:tq], mask[:tq], targets[:tq], pairs)
            ours = run_sweep(config, params, ids[:tq], mask[:tq], targets[:tq], grid.take(picks),
                             metrics=("rank", "logit"), per_query=True, top_k=0, progress=False)
            tl_ranks, tl_logits = np.asarray(tl["ranks"]), np.asarray(tl["logits"])
            tl_cq = len(pairs) * tq / tl["loop_s"]
            tl_full_s = tl["load_s"] + grid.size * n / tl_cq
            out["transformer_lens"] = {
                "sample_configs": len(pairs), "sample_queries": tq, "load_s": tl["load_s"], "loop_s": tl["loop_s"],
                "cq_per_s": tl_cq, "extrapolated_end_to_end_s": tl_full_s,
                "speedup_end_to_end": tl_full_s / (load_s + exact_s),
                "speedup_steady": (cq / steady_s) / tl_cq,
                "ranks_equal": bool(np.array_equal(tl_ranks, ours.ranks)),
                "ranks_equal_fraction": float(np.mean(tl_ranks == ours.ranks)),
                "max_abs_target_logit_diff": float(np.abs(tl_logits - ours.target_logits).max()),
                "clean_ranks": [c[0] for c in tl["clean"]], "torch": tl["torch"], "threads": tl["threads"],
                "transformer_lens": tl["transformer_lens"]}
            log(f"   {tl_cq:.1f} cq/s (load {tl['load_s']:.1f} s); ranks equal ours: "
                f"{out['transformer_lens']['ranks_equal']}; target logits within "
                f"{out['transformer_lens']['max_abs_target_logit_diff']:.1e}")
        except Exception as exc:  # report, do not hide
            out["transformer_lens"] = {"error": str(exc)[-2000:]}
            log(f"   TransformerLens failed: {str(exc)[-1500:]}")
            tl = None

    agreement = {}
    if not args.skip_attribution:
        # 4. AtP* / AtP for all neurons --------------------------------------------------------------------------
        log(f"4. AtP* for {grid.size} neurons on {n} queries")
        atp_star, atp_star_s = timed(lambda: attribute(config, params, ids, mask, targets, grid, method="atp*",
                                                       metric="logit", query_chunk=qc, progress=False))
        log(f"   AtP* {atp_star_s:.1f} s = {atp_star_s / exact_s:.2%} of the exact sweep")
        atp, atp_s = timed(lambda: attribute(config, params, ids, mask, targets, grid, method="atp", metric="logit",
                                             query_chunk=qc, progress=False))
        log(f"   AtP {atp_s:.1f} s = {atp_s / exact_s:.2%} of the exact sweep")
        out["attribution_time"] = {"atp_star_s": atp_star_s, "atp_s": atp_s,
                                   "atp_star_fraction_of_exact": atp_star_s / exact_s,
                                   "atp_fraction_of_exact": atp_s / exact_s}

        # 5. attribution vs exact --------------------------------------------------------------------------------
        log("5. attribution vs exact (heads, components, neurons)")

        def compare(name, sweep, exact_effect, star, plain):
            agreement[name] = {
                "configs": sweep.size,
                "spearman_effect_vs_atp": spearman(exact_effect, plain.scores),
                "spearman_effect_vs_atpstar_scores": spearman(exact_effect, star.scores),
                "spearman_abs_effect_vs_atpstar_ranking": spearman(np.abs(exact_effect), star.ranking),
                "spearman_abs_effect_vs_atp_ranking": spearman(np.abs(exact_effect), plain.ranking),
            }
            if sweep.size > 200:
                agreement[name]["top100_overlap_atpstar"] = top_overlap(np.abs(exact_effect), star.ranking, 100)
                agreement[name]["top100_overlap_atp"] = top_overlap(np.abs(exact_effect), plain.ranking, 100)
            log(f"   {name}: {agreement[name]}")

        for name, sweep in (("cross_attn heads", site_grid(config, "decoder.*.cross_attn.hook_z", unit="head")),
                            ("self-attn heads", site_grid(config, "decoder.*.attn.hook_z", unit="head")),
                            ("layer x component", component_grid(config))):
            result = run_sweep(config, params, ids, mask, targets, sweep, metrics=("rank", "logit"), per_query=False,
                               query_chunk=qc, progress=False)
            star = attribute(config, params, ids, mask, targets, sweep, method="atp*", metric="logit", query_chunk=qc,
                             progress=False)
            plain = attribute(config, params, ids, mask, targets, sweep, method="atp", metric="logit", query_chunk=qc,
                              progress=False)
            compare(name, sweep, result.aggregates["logit_effect"], star, plain)
        compare("neurons", grid, exact.aggregates["logit_effect"], atp_star, atp)
        out["agreement"] = agreement

    # 6. memory ------------------------------------------------------------------------------------------------
    if not args.skip_memory:
        mq = args.memory_queries
        mcc = cc
        log(f"6. peak RSS, {mq} queries, query chunk {mq}, config chunk {mcc} (separate processes)")
        memory = {}
        for copies in (1, 8):
            memory[str(copies * grid.size)] = memory_run(copies, mq, mq, mcc)
            log(f"   {copies * grid.size} configs: {memory[str(copies * grid.size)]}")
        out["memory"] = memory
    out["loadavg_end"] = loadavg()
    tmp.cleanup()

    # table ------------------------------------------------------------------------------------------------------
    e = out["exact"]
    print(f"\nmodel: T5 v1.0 24+24 layers, d_model {D_MODEL}, {HEADS} heads, d_ff {D_FF}, vocab {VOCAB}, random; "
          f"{n} queries (padded to {s}); devices {out['devices']}, {out['cpu_count']} CPUs")
    print(f"load average: start {out['loadavg_start']} | end {out['loadavg_end']}")
    print(f"query chunk {qc}, config chunk {cc}")
    rows = [
        ("1. exact neuron sweep, 12,288 configs", f"{e['end_to_end_s']:.1f} s end-to-end (compile {e['compile_s']:.1f} s)"),
        ("   steady config-queries/s", f"{e['steady_cq_per_s']:,.0f}"),
        ("   achieved FLOP/s (analytic)", f"{e['achieved_gflops']:.1f} GFLOP/s = {e['ratio_to_matmul']:.0%} of matmul "
                                         f"({max(e['matmul_gflops_before'], e['matmul_gflops_after']):.1f} GFLOP/s)"),
        ("   FLOPs per config-query (sweep part)", f"{e['flops_per_config_query'] / 1e6:.2f} MFLOP executed (analytic), "
                                                  f"{e['minimum_flops_per_config_query'] / 1e6:.2f} MFLOP the minimum "
                                                  f"an exact patch needs = {e['executed_over_minimum']:.2f}x"),
    ]
    if "rank_window" in out:
        rows += [
            ("1b. rank window (every 4th neuron)", f"{out['rank_window']['off_s']:.1f} s off vs "
                                                    f"{out['rank_window']['on_s']:.1f} s on = "
                                                    f"{out['rank_window']['speedup']:.2f}x; "
                                                    f"{out['rank_window']['rows_decided']:.1%} decided by the bound; "
                                                    f"ranks equal: {out['rank_window']['ranks_equal']}"
                                                    + (f" ({out['rank_window']['ranks_differing']} differ, closest "
                                                       f"relative logit gap at most "
                                                       f"{max(d['closest_relative_gap'] for d in out['rank_window_differences']):.1e})"
                                                       if out['rank_window_differences'] else "")),
            ("2. prefix sharing (every 8th neuron)", f"{out['prefix_sharing']['unshared_s']:.1f} s off vs "
                                                     f"{out['prefix_sharing']['shared_s']:.1f} s on = "
                                                     f"{out['prefix_sharing']['speedup']:.2f}x (analytic "
                                                     f"{out['prefix_sharing']['analytic_flop_ratio']:.2f}x)"),
        ]
    torch_out = out.get("torch_loops")
    if torch_out and "error" not in torch_out:
        for name, loop in sorted(torch_out["loops"].items(), key=lambda item: -item[1]["cq_per_s"]):
            ratio = (f"ours {torch_out['ratios'][name]:.1f}x" if torch_out["ratios"] else "ratio not reported: busy")
            rows.append((f"3a. torch {name} ({torch_out['configs']} x {torch_out['queries']})",
                         f"{loop['cq_per_s']:.1f} cq/s, {torch_out['threads']} threads, ranks equal "
                         f"{loop['ranks_equal_fraction']:.2%}; {ratio}"))
        bound = torch_out.get("encoder_cached_bound")
        if bound:
            rows.append(("3a. limit vs encoder_cached", f"it executes {bound['torch_flops_per_config_query'] / 1e6:.1f} "
                         f"MFLOP/cq at {bound['torch_achieved_gflops']:.1f} GFLOP/s; an exact method at the matmul "
                         f"peak: at most {bound['largest_exact_ratio_at_matmul_peak']:.1f}x"))
    elif torch_out:
        rows.append(("3a. torch loops", "FAILED: " + torch_out["error"].splitlines()[-1][:100]))
    t = out.get("transformer_lens")
    if t and "error" not in t:
        rows += [("3. TransformerLens run_with_hooks", f"{t['cq_per_s']:.1f} cq/s ({t['sample_configs']} x "
                                                      f"{t['sample_queries']} sample, torch {t['threads']} threads)"),
                 ("   TL extrapolated to 12,288 x N", f"{t['extrapolated_end_to_end_s'] / 3600:.1f} h"),
                 ("   speed-up end-to-end / steady", f"{t['speedup_end_to_end']:.0f}x / {t['speedup_steady']:.0f}x"),
                 ("   TL ranks equal ours", f"{t['ranks_equal']} (logits within {t['max_abs_target_logit_diff']:.1e})")]
    elif t:
        rows.append(("3. TransformerLens", "FAILED: " + t["error"].splitlines()[-1][:100]))
    else:
        rows.append(("3. TransformerLens", "skipped"))
    if "attribution_time" in out:
        a = out["attribution_time"]
        rows += [("4. AtP* all neurons", f"{a['atp_star_s']:.1f} s = {a['atp_star_fraction_of_exact']:.2%} of exact"),
                 ("   AtP all neurons", f"{a['atp_s']:.1f} s = {a['atp_fraction_of_exact']:.2%} of exact")]
    for name, values in agreement.items():
        text = (f"rho(effect, AtP) {values['spearman_effect_vs_atp']:.3f}, "
                f"rho(|effect|, AtP* ranking) {values['spearman_abs_effect_vs_atpstar_ranking']:.3f}, "
                f"rho(|effect|, |AtP|) {values['spearman_abs_effect_vs_atp_ranking']:.3f}")
        if "top100_overlap_atpstar" in values:
            text += (f", top-100 overlap AtP* {values['top100_overlap_atpstar']:.0%} / "
                     f"AtP {values['top100_overlap_atp']:.0%}")
        rows.append((f"5. {name} ({values['configs']})", text))
    if "memory" in out:
        for key, value in out["memory"].items():
            rows.append((f"6. peak RSS, {int(key):,} configs x {value['queries']} q",
                         f"{value['peak_rss_mib']:.0f} MiB (before sweep {value['rss_before_sweep_mib']:.0f} MiB; "
                         f"{value['seconds']:.1f} s)"))
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2, default=lambda x: x.item() if hasattr(x, "item") else str(x))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
