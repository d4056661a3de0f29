"""Attribution patching (AtP, AtP*) against exact patching on a trained checkpoint and its correct queries.

    python benchmarks/attribution_vs_exact.py -c models/squad-dsi --val-queries data/squad/val_queries.json \
        --correct-valid eval/val/correct_valid.json [--max-queries 200] [--json out.json]

For every decoder head (cross- and self-attention, `hook_z`), every decoder layer x component and every MLP
neuron of every decoder layer, zero ablation, metric: the target docid's logit. Reports the Spearman
correlation of the exact mean effect with AtP's signed estimate, and of |exact| with AtP*'s GradDrop
magnitude; for neurons, the share of the exact top-100 (by |effect|) in AtP*'s / AtP's top-100; and the
times of the exact sweeps and of the attributions. Not a test.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from genir_jax.interp import sweep as sw
from genir_jax.analysis.inputs import load_correct_queries, tokenize_for_analysis
from genir_jax.interp.attribution import attribute, spearman, top_overlap
from genir_jax.checkpoints.hf import load_for_analysis
from genir_jax.interp.patching import run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--checkpoint", required=True)
    parser.add_argument("--val-queries", required=True)
    parser.add_argument("--correct-valid", required=True)
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = load_for_analysis(args.checkpoint)
    config, params = model.config, model.params
    queries = load_correct_queries(args.val_queries, args.correct_valid, model.tokenizer)[: args.max_queries]
    ids, mask = tokenize_for_analysis(model.tokenizer, [q.text for q in queries])
    targets = np.asarray([q.token_id for q in queries], np.int32)
    print(f"{args.checkpoint}: {config.num_layers}+{config.num_decoder_layers} layers, d_model {config.d_model}, "
          f"{len(queries)} correct queries")
    grids = {
        "cross-attention heads": sw.site_grid(config, "decoder.*.cross_attn.hook_z", unit="head"),
        "self-attention heads": sw.site_grid(config, "decoder.*.attn.hook_z", unit="head"),
        "layer x component": sw.component_grid(config),
        "neurons": sw.site_grid(config, "decoder.*.mlp.hook_post", unit="neuron"),
    }
    report = {"checkpoint": args.checkpoint, "queries": len(queries)}
    for name, grid in grids.items():
        started = time.perf_counter()
        exact = run_sweep(config, params, ids, mask, targets, grid, metrics=("logit",), per_query=False,
                          progress=False).aggregates["logit_effect"]
        exact_seconds = time.perf_counter() - started
        row = {"configs": grid.size, "exact_seconds": exact_seconds}
        for method in ("atp", "atp*"):
            started = time.perf_counter()
            result = attribute(config, params, ids, mask, targets, grid, method=method, metric="logit", progress=False)
            row[f"{method}_seconds"] = time.perf_counter() - started
            row[f"spearman_effect_vs_{method}_score"] = spearman(exact, result.scores)
            row[f"spearman_abs_effect_vs_{method}_ranking"] = spearman(np.abs(exact), result.ranking)
            if name == "neurons":
                row[f"top100_overlap_{method}"] = top_overlap(np.abs(exact), result.ranking, 100)
        report[name] = row
        print(f"{name:24s} " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
