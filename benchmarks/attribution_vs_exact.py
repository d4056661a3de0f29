"""Attribution patching (AtP, AtP*) against exact patching on a trained checkpoint and its correct queries.

    python benchmarks/attribution_vs_exact.py -c models/squad-dsi --val-queries data/squad/val_queries.json \
        --correct-valid eval/val/correct_valid.json [--max-queries 200] [--modes zero mean] [--json out.json]

The library analysis `genir_jax.analysis.attribution_agreement` (what `reproduce --attribution-agreement` reports):
every decoder head (cross- and self-attention, `hook_z`), every decoder layer x component and every MLP neuron of
every decoder layer, zero and/or mean ablation, metric: the target docid's logit. Prints, per unit family, mode
and method, the Spearman correlation of the exact mean effect with the signed estimate and of |exact| with the
method's ranking (|AtP|; AtP*'s GradDrop magnitude), the top-k overlap, each with its 95% bootstrap interval over
the queries, and the wall times of the exact sweep and of the attribution. Not a test.
"""

from __future__ import annotations

import argparse
import json

from genir_jax.analysis.attribution_agreement import MODES, run_attribution_agreement
from genir_jax.analysis.inputs import load_correct_queries, tokenize_for_analysis
from genir_jax.checkpoints.hf import load_for_analysis

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--checkpoint", required=True)
    parser.add_argument("--val-queries", required=True)
    parser.add_argument("--correct-valid", required=True)
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = load_for_analysis(args.checkpoint)
    config, params = model.config, model.params
    queries = load_correct_queries(args.val_queries, args.correct_valid, model.tokenizer)[: args.max_queries]
    ids, mask = tokenize_for_analysis(model.tokenizer, [q.text for q in queries])
    targets = np.asarray([q.token_id for q in queries], np.int32)
    print(f"{args.checkpoint}: {config.num_layers}+{config.num_decoder_layers} layers, d_model {config.d_model}, "
          f"{len(queries)} correct queries")
    result = run_attribution_agreement(config, params, ids, mask, targets, modes=args.modes, progress=False)
    for row in result.rows:
        times = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in row.seconds.items())
        print(f"{row.family:22s} {row.mode:4s} {row.method:4s} {row.items:6d} units: signed {row.signed.format(3)}, "
              f"magnitude {row.magnitude.format(3)}, top-{row.top_k} overlap {row.overlap.format(2)} ({times})",
              flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"checkpoint": args.checkpoint, **result.record()}, handle, indent=1)


if __name__ == "__main__":
    main()
