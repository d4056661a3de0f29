"""Decoder-only neuron sweep: genir-jax's exact sweep against TransformerLens' HookedTransformer, one run.

Workload: a random GPT-2-style model (default 24 layers, d_model 128, 4 heads, d_ff 512, vocabulary 4,096;
genir-jax's `init_params`, saved as a transformers GPT-2 checkpoint that both sides load); N queries (default
200): SQuAD v1.1 dev questions tokenized by a byte-level BPE trained here on the SQuAD dev text (random ids if
the data is missing), right-padded, each query's target the clean model's top token at its last real token
(the docid position of a decoder-only GenIR model). A configuration zeroes one MLP neuron
(``blocks.{l}.mlp.hook_post``, every position); the metric is the target's rank over the whole vocabulary
(ties: lower id first) and its logit.

Compared, each side in its own interpreter, one after the other (so neither's threads disturb the other):

  1. genir-jax (this interpreter's venv): `run_sweep` over ``site_grid(config, "blocks.*.mlp.hook_post",
     unit="neuron")`` (every neuron of every layer; ``--neuron-stride K`` keeps every K-th neuron of each
     layer), per_query=False: end to end (cold: compile included) and steady state (the same sweep again,
     warm); then the TransformerLens sample's configurations per query, for the rank check;
  2. TransformerLens 2.x `HookedTransformer` (``--tl-python``, `benchmarks/tl_decoder_loops.py`): on a sample
     of ``--tl-per-layer`` random neurons of every layer, (a) the reference's loop, one ``run_with_hooks`` per
     (config, query) on the first ``--tl-reference-queries`` queries, (b) one batched ``run_with_hooks`` per
     config over all queries, (c) the residual cached below the patched layer, only later layers run, last
     positions unembedded, (d) as (c) with configurations of one layer batched. Its logits are checked
     against transformers' before timing, and its ranks against genir-jax's on every sampled (config,
     query): the run fails (exit 1) if any differs.

Reported: config-queries/s of each, genir-jax's over each TransformerLens loop's (steady and end to end, the
TransformerLens end to end being its load time plus the whole grid at its sampled rate), thread counts, the
load. The load check (/proc/stat, `torch_baselines.machine_is_idle`) runs first; on a busy machine the
ratios are withheld unless ``--allow-busy`` (then they are printed, labelled busy).

    PYTHONPATH=. python benchmarks/bench_decoder_sweep.py --tl-python /work/tlvenv2/bin/python \
        [--queries 200] [--neuron-stride 1] [--tl-per-layer 2] [--tl-reference-queries 10] \
        [--layers 24 --d-model 128 --heads 4 --d-ff 512 --vocab 4096] [--threads 2] [--allow-busy] [--json out.json]

The TransformerLens venv: ``pip install torch transformer-lens<3`` (2.x: 4.x removed `HookedTransformer`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from torch_baselines import loadavg, log, machine_is_idle  # noqa: E402

SQUAD = "squad-v1.1-dev/dev-v1.1.json"
NEURONS = "blocks.*.mlp.hook_post"


def data_dir() -> str:
    return os.environ.get("GENIR_JAX_DATA") or os.path.join(HERE, "..", "..", "shared", "data")


def make_queries(count: int, vocab: int, max_len: int, seed: int = 0) -> tuple[list[list[int]], str]:
    """Token ids of `count` queries: SQuAD dev questions under a byte-level BPE of `vocab` tokens trained on
    the SQuAD dev text, or (no data) random ids of 8-20 tokens. Returns (queries, a line saying which)."""
    path = os.path.join(data_dir(), SQUAD)
    rng = np.random.default_rng(seed)
    if os.path.isfile(path):
        from tokenizers import ByteLevelBPETokenizer

        with open(path) as handle:
            articles = json.load(handle)["data"]
        paragraphs = [p for a in articles for p in a["paragraphs"]]
        texts = [p["context"] for p in paragraphs] + [qa["question"] for p in paragraphs for qa in p["qas"]]
        questions = [qa["question"] for p in paragraphs for qa in p["qas"]]
        tokenizer = ByteLevelBPETokenizer()
        tokenizer.train_from_iterator(texts, vocab_size=vocab, min_frequency=2, show_progress=False)
        picks = rng.choice(len(questions), size=count, replace=False)
        out = [tokenizer.encode(questions[i]).ids[:max_len] for i in picks]
        return out, (f"{count} SQuAD v1.1 dev questions (seeded sample), byte-level BPE of "
                     f"{tokenizer.get_vocab_size()} tokens trained on the dev text")
    lengths = rng.integers(8, 21, size=count)
    return [rng.integers(1, vocab, size=n).tolist() for n in lengths], f"{count} random queries (no {path})"


# --------------------------------------------------------------------------------------------------
# genir-jax side (its own interpreter)
# --------------------------------------------------------------------------------------------------

def jax_child(spec_path: str, out_path: str) -> None:
    with open(spec_path) as handle:
        spec = json.load(handle)
    began = time.perf_counter()
    import jax

    from genir_jax.checkpoints.decoder_hf import PretrainedDecoder, load_decoder_only, save_decoder_only
    from genir_jax.core import decoder_only as do
    from genir_jax.core.decoder_config import gpt2_config
    from genir_jax.interp.patching import run_sweep
    from genir_jax.interp.sweep import site_grid

    shape = spec["shape"]
    config = gpt2_config(vocab_size=shape["vocab"], d_model=shape["d_model"], num_layers=shape["layers"],
                         num_heads=shape["heads"], d_ff=shape["d_ff"], max_position_embeddings=shape["positions"],
                         bos_token_id=0, eos_token_id=0)
    save_decoder_only(spec["checkpoint"], PretrainedDecoder(config=config, params=do.init_params(config, shape["seed"])))
    model = load_decoder_only(spec["checkpoint"], load_tokenizer=False)  # what the user's path reads
    config, params = model.config, model.params
    queries = spec["queries"]
    n, width = len(queries), max(len(q) for q in queries)
    ids = np.zeros((n, width), np.int32)
    mask = np.zeros_like(ids)
    for row, q in enumerate(queries):
        ids[row, : len(q)] = q
        mask[row, : len(q)] = 1
    last = np.asarray(do.last_positions(mask))
    clean = np.asarray(do.forward(config, params, ids, mask))[np.arange(n), last]
    targets = clean.argmax(-1).astype(np.int32)  # the clean top token: rank 0, as a correct query's docid
    load_s = time.perf_counter() - began

    grid = site_grid(config, NEURONS, unit="neuron")
    keep = np.flatnonzero(np.asarray(grid.labels["neuron"]) % spec["neuron_stride"] == 0)
    grid = grid if len(keep) == grid.size else grid.take(keep)
    kwargs = dict(metrics=("rank", "logit"), per_query=False, progress=False)
    for key in ("query_chunk", "config_chunk"):
        if spec.get(key):
            kwargs[key] = spec[key]
    began = time.perf_counter()
    cold = run_sweep(config, params, ids, mask, targets, grid, **kwargs)
    cold_s = time.perf_counter() - began
    began = time.perf_counter()
    warm = run_sweep(config, params, ids, mask, targets, grid, **kwargs)
    warm_s = time.perf_counter() - began
    if not np.array_equal(cold.aggregates["rank>0"], warm.aggregates["rank>0"]):
        raise SystemExit("the cold and warm sweeps disagree")

    layer_of = np.asarray(grid.labels["layer"])
    full = site_grid(config, NEURONS, unit="neuron")
    index = {(int(l), int(u)): k for k, (l, u) in enumerate(zip(full.labels["layer"], full.labels["neuron"]))}
    picks = np.array([index[tuple(p)] for p in spec["pairs"]])
    sample = run_sweep(config, params, ids, mask, targets, full.take(picks), metrics=("rank", "logit"),
                       per_query=True, top_k=0, progress=False)
    out = {"load_s": load_s, "configs": grid.size, "queries": n, "padded_length": width,
           "cold_s": cold_s, "warm_s": warm_s, "stats": {k: v for k, v in warm.stats.items()
                                                         if isinstance(v, (int, float, str, bool))},
           "configs_with_any_rank_change": int(np.sum(warm.aggregates["rank>0"] > 0)),
           "layers_in_grid": sorted(set(int(x) for x in layer_of)), "neurons_per_layer": int(np.sum(layer_of == 0)),
           "targets": targets.tolist(), "clean_ranks": np.asarray(sample.clean["rank"]).tolist(),
           "clean_logits": np.asarray(sample.clean["logit"]).tolist(),
           "sample_ranks": np.asarray(sample.ranks).tolist(), "sample_logits": np.asarray(sample.target_logits).tolist(),
           "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "model": str(config)}
    with open(out_path, "w") as handle:
        json.dump(out, handle)


def run_child(command: list[str], what: str, env: dict | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{what} failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--max-query-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--neuron-stride", type=int, default=1, help="genir-jax sweeps every K-th neuron of each layer")
    parser.add_argument("--query-chunk", type=int, default=0)
    parser.add_argument("--config-chunk", type=int, default=0)
    parser.add_argument("--tl-python", default=os.environ.get("TL_PYTHON", "/work/tlvenv2/bin/python"))
    parser.add_argument("--tl-per-layer", type=int, default=2, help="TransformerLens' sample: neurons per layer")
    parser.add_argument("--tl-reference-queries", type=int, default=10)
    parser.add_argument("--tl-configs-per-batch", type=int, default=16)
    parser.add_argument("--tl-loops", default="reference,batched,cached,cached_configs_batched")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the TransformerLens side")
    parser.add_argument("--skip-tl", action="store_true",
                        help="genir-jax's side only (no TransformerLens venv): its sweep, no ratios")
    parser.add_argument("--allow-busy", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--jax-child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.jax_child:
        return jax_child(*args.jax_child)

    idle, load_line = machine_is_idle()
    log(f"load check: {load_line}: {'idle' if idle else 'BUSY'}")
    out = {"load_check": load_line, "idle": idle, "loadavg_start": loadavg(), "cpu_count": os.cpu_count(),
           "args": {k: v for k, v in vars(args).items() if k != "jax_child"}}
    queries, source = make_queries(args.queries, args.vocab, args.max_query_tokens, args.seed)
    out["query_source"] = source
    log(source + f"; lengths {min(map(len, queries))}-{max(map(len, queries))} tokens")
    rng = np.random.default_rng(args.seed + 1)
    pairs = [[layer, int(u)] for layer in range(args.layers)
             for u in np.sort(rng.choice(args.d_ff, size=args.tl_per_layer, replace=False))]
    shape = dict(layers=args.layers, d_model=args.d_model, heads=args.heads, d_ff=args.d_ff, vocab=args.vocab,
                 positions=max(64, args.max_query_tokens), seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "gpt2")
        spec = {"checkpoint": checkpoint, "shape": shape, "queries": queries, "pairs": pairs,
                "neuron_stride": args.neuron_stride, "query_chunk": args.query_chunk,
                "config_chunk": args.config_chunk}
        with open(os.path.join(tmp, "jax_spec.json"), "w") as handle:
            json.dump(spec, handle)
        log(f"1. genir-jax ({sys.executable}): the neuron sweep cold, warm, then the {len(pairs)} sampled configs")
        began = time.perf_counter()
        run_child([sys.executable, os.path.abspath(__file__), "--jax-child", os.path.join(tmp, "jax_spec.json"),
                   os.path.join(tmp, "jax_out.json")], "genir-jax")
        with open(os.path.join(tmp, "jax_out.json")) as handle:
            ours = json.load(handle)
        ours["process_s"] = time.perf_counter() - began
        cq = ours["configs"] * ours["queries"]
        ours["steady_cq_per_s"] = cq / ours["warm_s"]
        ours["end_to_end_s"] = ours["load_s"] + ours["cold_s"]
        ours["end_to_end_cq_per_s"] = cq / ours["end_to_end_s"]
        log(f"   {ours['configs']} configs x {ours['queries']} queries: cold {ours['cold_s']:.1f} s, warm "
            f"{ours['warm_s']:.1f} s = {ours['steady_cq_per_s']:,.0f} cq/s steady (load {ours['load_s']:.1f} s)")

        if args.skip_tl:
            for key in ("targets", "sample_ranks", "sample_logits", "clean_logits"):
                ours.pop(key, None)
            out.update(loadavg_end=loadavg(), genir_jax=ours, failures=[])
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump(out, handle, indent=2)
            print(f"load: {load_line}; genir-jax only (--skip-tl): {ours['configs']:,} configs x {ours['queries']} "
                  f"queries, {ours['steady_cq_per_s']:,.0f} cq/s steady, {ours['end_to_end_cq_per_s']:,.0f} end to end")
            return
        tl_spec = {"checkpoint": checkpoint, "queries": queries, "targets": ours["targets"], "pairs": pairs,
                   "reference_queries": min(args.tl_reference_queries, args.queries), "threads": args.threads,
                   "configs_per_batch": args.tl_configs_per_batch, "loops": args.tl_loops.split(",")}
        with open(os.path.join(tmp, "tl_spec.json"), "w") as handle:
            json.dump(tl_spec, handle)
        log(f"2. TransformerLens ({args.tl_python}, {args.threads} torch threads): loops {tl_spec['loops']} on "
            f"{len(pairs)} configs")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("PYTHONPATH", None)
        run_child([args.tl_python, os.path.join(HERE, "tl_decoder_loops.py"), os.path.join(tmp, "tl_spec.json"),
                   os.path.join(tmp, "tl_out.json")], "TransformerLens", env)
        with open(os.path.join(tmp, "tl_out.json")) as handle:
            tl = json.load(handle)
    out["loadavg_end"] = loadavg()

    # ranks: equal on every shared (config, query), clean included -----------------------------------------
    failures = []
    if tl["clean_ranks"] != ours["clean_ranks"]:
        failures.append(f"clean ranks differ: {np.flatnonzero(np.array(tl['clean_ranks']) != ours['clean_ranks'])}")
    mine_ranks, mine_logits = np.asarray(ours["sample_ranks"]), np.asarray(ours["sample_logits"])
    grid_all = args.layers * args.d_ff * args.queries  # every neuron of every layer
    loops = {}
    for name, loop in tl["loops"].items():
        q = loop["queries"]
        ranks, logits = np.asarray(loop["ranks"]), np.asarray(loop["logits"])
        equal = ranks == mine_ranks[:, :q]
        rate = loop["config_queries"] / loop["seconds"]
        loops[name] = {"cq_per_s": rate, "configs": len(pairs), "queries": q, "seconds": loop["seconds"],
                       "ranks_equal": bool(equal.all()), "pairs_checked": int(equal.size),
                       "max_abs_target_logit_diff": float(np.abs(logits - mine_logits[:, :q]).max()),
                       "steady_ratio": ours["steady_cq_per_s"] / rate,
                       "end_to_end_ratio": (tl["load_s"] + grid_all / rate) / (grid_all / ours["end_to_end_cq_per_s"])}
        if not equal.all():
            bad = np.argwhere(~equal)[:5]
            failures.append(f"{name}: {int((~equal).sum())} of {equal.size} ranks differ, e.g. (pair, query) "
                            f"{bad.tolist()}: TL {[int(ranks[i, j]) for i, j in bad]} vs ours "
                            f"{[int(mine_ranks[i, j]) for i, j in bad]}")
    out.update(genir_jax=ours, transformer_lens={k: v for k, v in tl.items() if k != "loops"}, tl_loops=loops,
               failures=failures)
    for key in ("targets", "sample_ranks", "sample_logits", "clean_logits"):
        ours.pop(key, None)
    out["transformer_lens"].pop("clean_logits", None)

    # report ------------------------------------------------------------------------------------------------------
    report_ratios = idle or args.allow_busy
    label = "" if idle else " [BUSY machine: ratios measured under load]"
    print(f"\nmodel: GPT-2 style, {args.layers} layers, d_model {args.d_model}, {args.heads} heads, d_ff {args.d_ff}, "
          f"vocab {args.vocab}, random (genir-jax init_params, seed {args.seed}); {source}; padded to "
          f"{ours['padded_length']} tokens")
    print(f"load: {load_line}; load average start {out['loadavg_start']} | end {out['loadavg_end']}")
    print(f"genir-jax: jax {ours['jax']} on {ours['devices']} (XLA's default threads: all {os.cpu_count()} cores); "
          f"TransformerLens {tl['transformer_lens']}, torch {tl['torch']} on {tl['threads']} threads")
    print(f"TL logits vs transformers: max |diff| {tl['logit_check']['max_abs_tl_vs_transformers']:.1e} "
          f"(logits up to {tl['logit_check']['max_abs_logit']:.1f})")
    print(f"genir-jax sweep: {ours['configs']:,} configs ({ours['neurons_per_layer']} neurons x {len(ours['layers_in_grid'])} "
          f"layers) x {ours['queries']} queries; {ours['configs_with_any_rank_change']} configs change some rank")
    print(f"  end to end {ours['end_to_end_s']:.1f} s (load+init {ours['load_s']:.1f} s, cold sweep {ours['cold_s']:.1f} s): "
          f"{ours['end_to_end_cq_per_s']:,.0f} cq/s; steady {ours['warm_s']:.1f} s: {ours['steady_cq_per_s']:,.0f} cq/s")
    for name, loop in loops.items():
        ratio = (f"genir-jax {loop['steady_ratio']:,.1f}x steady, {loop['end_to_end_ratio']:,.1f}x end to end{label}"
                 if report_ratios else "ratio withheld: busy machine (--allow-busy prints it)")
        print(f"  TL {name:<24} {loop['cq_per_s']:10.1f} cq/s ({loop['configs']} configs x {loop['queries']} q, "
              f"{loop['seconds']:.1f} s); ranks equal on {loop['pairs_checked']} pairs: {loop['ranks_equal']} "
              f"(logits within {loop['max_abs_target_logit_diff']:.1e}); {ratio}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)
        print(f"wrote {args.json}")
    if failures:
        print("\nFAILED: ranks differ between genir-jax and TransformerLens:\n  " + "\n  ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
