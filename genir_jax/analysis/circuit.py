"""Minimal circuit (paper Table 4): how much retrieval survives when most components are knocked out.

A circuit is data: a list of patches, each "component X in stages S is zeroed / replaced by its mean".
The paper's circuit (`PAPER_CIRCUIT`): remove self-attention in every layer and cross-attention in stage I,
replace the MLP outputs of stages I and II by their mean; keep the rest. Means are over the correct
validation queries (as in the reference's `eval_patching_all_stages.py`); the circuit is evaluated on the
TEST queries: Hits@1, Recall@5, Hits@10 (and MRR@10, nDCG@10), absolute and relative to the unpatched model,
both computed in the same sweep (config 0: nothing patched, config 1: the circuit).

Circuit file format (JSON)::

    {"name": "paper",
     "patches": [{"component": "attn", "stages": "all", "mode": "zero"},
                 {"component": "cross_attn", "stages": [0], "mode": "zero"},
                 {"component": "mlp", "stages": [0, 1], "mode": "mean"}]}

Stage indices refer to the stage list in use (the paper's 0-6 / 7-17 / 18-23 for 24 decoder layers).
Default ranking: docid tokens only with attention masks (as `genir-jax evaluate`); reference mode: the
reference's padding (longest correct validation query + 1, no mask) and top-100 over the full vocabulary.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from genir_jax.core.config import T5Config
from genir_jax.base.errors import DataError, GenIRError
from genir_jax.interp.interventions import ABLATION_MODES, Interventions, combine, mean_ablation, zero_ablation
from genir_jax.interp.patching import run_sweep
from genir_jax.core.sites import COMPONENT_SITES, components, is_decoder_only, site_name, stacks
from genir_jax.interp.sweep import Sweep, stack

RESULTS_JSON = "minimal_circuit.json"
REFERENCE_RESULTS_JSON = "patching_results_best_circuit.json"  # eval_patching_all_stages.py's name (reference mode)
# eval_patching_all_stages.py's "config" text for its (the paper's) circuit on the paper's stages
REFERENCE_CONFIG = "0-7 remove attn, remove cr-attn, mlp mean, 7 - 17 remove attn, mean mlp, 18 - 23 remove attn"
# Table 4's two rankings: the full vocabulary (as the reference ranks: word tokens may rise above the docid)
# and the docid tokens only (as `genir-jax evaluate`)
FULL_VOCABULARY, DOCID_TOKENS = "full vocabulary", "docid tokens only"
CIRCUIT_MODES = ABLATION_MODES[:2]  # zero and mean: the circuit's components are ablated within the model


@dataclasses.dataclass(frozen=True)
class CircuitPatch:
    """Knock out one component type in some stages: mode "zero" (replace by 0) or "mean"."""

    component: str
    stages: tuple[int, ...] | str  # stage indices, or "all"
    mode: str

    def layers(self, stages: Sequence[Sequence[int]]) -> list[int]:
        chosen = range(len(stages)) if self.stages == "all" else self.stages
        return sorted({layer for index in chosen for layer in stages[index]})


@dataclasses.dataclass(frozen=True)
class Circuit:
    name: str
    patches: tuple[CircuitPatch, ...]

    def describe(self, stages: Sequence[Sequence[int]]) -> str:
        parts = []
        for patch in self.patches:
            layers = patch.layers(stages)
            action = "remove" if patch.mode == "zero" else "mean"
            parts.append(f"{action} {patch.component} in layers {_ranges(layers)}")
        return "; ".join(parts) or "nothing patched"

    def as_json(self) -> dict:
        return {"name": self.name, "patches": [
            {"component": p.component, "stages": p.stages if p.stages == "all" else list(p.stages), "mode": p.mode}
            for p in self.patches]}


PAPER_CIRCUIT = Circuit("paper", (
    CircuitPatch("attn", "all", "zero"),
    CircuitPatch("cross_attn", (0,), "zero"),
    CircuitPatch("mlp", (0, 1), "mean"),
))


def default_circuit(config) -> Circuit:
    """The circuit `genir-jax circuit` evaluates without --circuit: the paper's (`PAPER_CIRCUIT`). A decoder-only
    model has none: the paper's circuit removes every self-attention layer, the only way such a model's
    prediction reads the query, so a circuit file is asked for."""
    if is_decoder_only(config):
        from genir_jax.analysis.applicability import NOT_APPLICABLE_TO_DECODER_ONLY

        raise GenIRError("the paper's circuit is not applicable to decoder-only models: "
                         f"{NOT_APPLICABLE_TO_DECODER_ONLY['minimal-circuit']}; give --circuit FILE with attn / mlp "
                         "patches")
    return PAPER_CIRCUIT


def _ranges(layers: Sequence[int]) -> str:
    out, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            out.append(f"{start}-{layer}" if layer != start else f"{layer}")
            start = None
    return ",".join(out) or "none"


CIRCUIT_KEYS = ("name", "patches")  # the fields of a circuit JSON, and of each of its patches
PATCH_KEYS = ("component", "stages", "mode")


def _refuse_unknown_keys(entry: dict, known: Sequence[str], where: str) -> None:
    unknown = [key for key in entry if key not in known]
    if unknown:
        raise DataError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(known)}")


def circuit_from_json(data, source: str, num_stages: int) -> Circuit:
    """Validate a circuit description; errors name the file and the patch."""
    if not isinstance(data, dict) or not isinstance(data.get("patches"), list):
        raise DataError(f"{source}: expected an object with a 'patches' list")
    _refuse_unknown_keys(data, CIRCUIT_KEYS, source)
    patches = []
    modes_by_stage: dict[tuple[str, int], tuple[str, int]] = {}  # (component, stage) -> (mode, patch index)
    for index, entry in enumerate(data["patches"]):
        where = f"{source}: patches[{index}]"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object")
        _refuse_unknown_keys(entry, PATCH_KEYS, where)
        component, mode, stages = entry.get("component"), entry.get("mode"), entry.get("stages")
        if component not in COMPONENT_SITES:
            raise DataError(f"{where}: field 'component' must be one of {', '.join(COMPONENT_SITES)}, "
                            f"got {component!r}")
        if mode not in CIRCUIT_MODES:
            raise DataError(f"{where}: field 'mode' must be 'zero' or 'mean', got {mode!r}")
        if stages != "all":
            if not isinstance(stages, list) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                       and 0 <= s < num_stages for s in stages):
                raise DataError(f"{where}: field 'stages' must be \"all\" or a list of stage indices in "
                                f"[0, {num_stages}), got {stages!r}")
            if len(set(stages)) != len(stages):
                raise DataError(f"{where}: field 'stages' lists a stage twice: {stages!r}")
            stages = tuple(stages)
        for stage in range(num_stages) if stages == "all" else stages:
            other_mode, other = modes_by_stage.setdefault((component, stage), (mode, index))
            if other_mode != mode:
                raise DataError(f"{where}: {component} of stage {stage} is patched with {mode!r} here and with "
                                f"{other_mode!r} by patches[{other}]; a stage's component takes one mode")
        patches.append(CircuitPatch(component, stages, mode))
    return Circuit(str(data.get("name", os.path.basename(source))), tuple(patches))


def circuit_configuration(config: T5Config, circuit: Circuit, stages: Sequence[Sequence[int]], means: dict | None
                          ) -> Interventions:
    """The circuit as one configuration: per component, its zeroed layers (`zero_ablation`), then its
    mean-replaced layers (`mean_ablation` with `means`), `combine`d. A layer whose component is both zeroed
    and mean-replaced is refused (one would silently win). Decoder-only models: attn and mlp of their blocks;
    a cross_attn patch is refused."""
    missing = sorted({p.component for p in circuit.patches} - set(components(config)))
    if missing:
        raise GenIRError(f"circuit {circuit.name!r}: component {missing[0]!r} is not in a decoder-only model (its "
                         f"layers have {' and '.join(components(config))})")
    parts = []
    for component in components(config):
        site = COMPONENT_SITES[component]
        zeroed, meaned = ({layer for p in circuit.patches if p.component == component and p.mode == mode
                           for layer in p.layers(stages)} for mode in ("zero", "mean"))
        if zeroed & meaned:
            raise GenIRError(f"circuit {circuit.name!r}: {component} of layer(s) {sorted(zeroed & meaned)} is both "
                             "zeroed and mean-replaced; a layer's component takes one mode")
        for mode in CIRCUIT_MODES:
            layers = sorted({layer for p in circuit.patches if p.component == component and p.mode == mode
                             for layer in p.layers(stages)})
            if not layers:
                continue
            sites = [site_name(stacks(config)[-1], site, layer) for layer in layers]
            if mode == "zero":
                parts.append(zero_ablation(config, sites))
            else:
                if means is None:
                    raise GenIRError(f"circuit {circuit.name!r}: mean patches need the means (`mean_activations`)")
                parts.append(mean_ablation(config, means, sites=sites))
    return combine(*parts)


def circuit_interventions(config: T5Config, circuit: Circuit, stages: Sequence[Sequence[int]], means: dict | None
                          ) -> Sweep:
    """Two configs: index 0 patches nothing (the unpatched model), index 1 applies the circuit."""
    return stack([{}, circuit_configuration(config, circuit, stages, means)],
                 labels=[{"circuit": "unpatched"}, {"circuit": circuit.name}])


def rank_with_circuit(config: T5Config, params, circuit_interventions_: Sweep, input_ids, attention_mask, targets,
                      candidates, *, top_k: int = 100, query_chunk: int | None = None, progress: bool = True):
    """(top ids [2, N, k] into `candidates`, their logits [2, N, k]) unpatched (0) and with the circuit (1)."""
    result = run_sweep(config, params, input_ids, attention_mask, targets, circuit_interventions_,
                       candidates=candidates, top_k=top_k, query_chunk=query_chunk, progress=progress)
    return result.top_ids, result.top_logits


def sequence_circuit_report(circuit: Circuit, stages: Sequence[Sequence[int]], query_ids: Sequence[str],
                            doc_ids: Sequence[str], indices, scores, qrels, step_ranks, logprobs, *,
                            correct_queries: int, scheme: str) -> tuple[dict, list]:
    """(``minimal_circuit.json``'s content, the two runs [unpatched, circuit]) for naive / semantic docids.

    `indices` / `scores` [2, N, R]: beam search (`genir_jax.docids.retrieval.rank_docid_sequences`) without and with
    the circuit, indices into `doc_ids` -> the retrieval metrics of both and their ratio, as for atomic docids.
    `step_ranks` [2, N, T] (-1 on padding) / `logprobs` [2, N]: each query's relevant docid teacher-forced
    without and with the circuit -> the shares of queries whose docid token keeps rank 0 at the first step
    (``first-step Hits@1``), at each step and at every step (``greedy Hits@1``: greedy decoding reproduces the
    docid), and the mean sequence log-probability; per query: each step's rank and the log-probability."""
    from genir_jax.docids.retrieval import run_from_ranking
    from genir_jax.docids.sequence_targets import kept_at_rank_0

    runs = [run_from_ranking(query_ids, doc_ids, np.asarray(indices[k]), np.asarray(scores[k])) for k in range(2)]
    measured = measure_runs(runs, qrels)
    step_ranks, logprobs = np.asarray(step_ranks), np.asarray(logprobs, np.float64)
    for k, name in enumerate(("unpatched", "patched")):
        kept = kept_at_rank_0(step_ranks[k])
        measured[name]["first-step Hits@1"] = float(np.mean(kept["first step"]))
        measured[name]["greedy Hits@1"] = float(np.mean(kept["every step"]))
        measured[name]["per-step Hits@1"] = [float(np.mean(flags)) for flags in kept["steps"]]
        measured[name]["mean logprob"] = float(logprobs[k].mean())
    unpatched, patched = measured["unpatched"], measured["patched"]
    for metric in ("first-step Hits@1", "greedy Hits@1"):
        measured["relative"][metric] = patched[metric] / unpatched[metric] if unpatched[metric] else None
    report = {
        "circuit": circuit.as_json(), "config": circuit.describe(stages), "stages": [list(s) for s in stages],
        "docids": scheme, "queries": len(query_ids), "mean_over_correct_queries": correct_queries,
        "ranking": "beam search over the docid trie (10 beams), patched at every decoding step; step ranks "
                   "and log-probabilities teacher-forced",
        "unpatched": unpatched, "patched": patched, "relative": measured["relative"],
        "retrieval_per_query": measured["per_query"],
        "per_query": {"query_ids": [str(q) for q in query_ids],
                      "step_ranks": [[[int(r) for r in row if r >= 0] for row in ranks] for ranks in step_ranks],
                      "worst_rank": step_ranks.max(axis=-1).tolist(), "logprob": logprobs.tolist()},
    }
    return report, runs


def reference_retrieval_metrics(top_ids, query_ids: Sequence[str], qrels, doc_of_token: dict) -> dict[str, float]:
    """hits@1, hits@10 and recall@5 computed as the reference's scripts compute them (their ``eval``):
    `top_ids` [N, k] full-vocabulary token ids in rank order (k = 100 there), word tokens never relevant;
    every qrels entry of a query counts as relevant whatever its grade; recall@5 = relevant among the top 5
    / the query's qrels entries, averaged over all N queries. `doc_of_token`: token id -> document id."""
    hits_1 = hits_10 = 0
    recall_5 = 0.0
    for query_id, row in zip(query_ids, top_ids):
        relevant = qrels.get(str(query_id), {})
        found = [rank for rank, token in enumerate(row.tolist()) if doc_of_token.get(int(token)) in relevant]
        hits_1 += any(rank == 0 for rank in found)
        hits_10 += any(rank < 10 for rank in found)
        in_top_5 = sum(rank < 5 for rank in found)
        if in_top_5:
            recall_5 += in_top_5 / len(relevant)
    count = len(query_ids)
    return {"hits@1": hits_1 / count, "hits@10": hits_10 / count, "recall@5": recall_5 / count}


@dataclasses.dataclass
class DocidTargets:
    """The docid tokens a circuit run ranks (`candidates`, sorted token ids), their documents (`doc_ids`,
    aligned with `candidates`), the token -> document map (`vocabulary`) and each query's target token
    (its first relevant document's)."""

    vocabulary: dict
    candidates: np.ndarray
    doc_ids: list[str]
    targets: np.ndarray


def docid_targets(tokenizer, queries: Sequence, queries_path, checkpoint) -> DocidTargets:
    """The docid candidates and the queries' targets; a `DataError` names the query (in `queries_path`) whose
    relevant document has no docid token in `checkpoint`."""
    from genir_jax.docids.tokens import docid_vocabulary

    vocabulary = docid_vocabulary(tokenizer)
    token_of = {doc: token_id for token_id, doc in vocabulary.items()}
    for query in queries:
        missing = [d for d in query.relevant_docs if d not in token_of]
        if missing:
            raise DataError(f"{queries_path}: query {query.id!r}: relevant document {missing[0]!r} has no docid "
                            f"token in {checkpoint}")
    candidates = np.asarray(sorted(vocabulary), dtype=np.int32)
    return DocidTargets(vocabulary, candidates, [vocabulary[int(t)] for t in candidates],
                        np.asarray([token_of[q.relevant_docs[0]] for q in queries], dtype=np.int32))


def measure_runs(runs, qrels) -> dict:
    """``unpatched`` / ``patched`` metrics of two runs [unpatched, circuit], the circuit's ``relative`` to the
    unpatched model's, and ``per_query`` {metric: [2][N] values, ``query_ids``: the qrels' queries} for
    intervals over queries."""
    from genir_jax.docids.retrieval import METRICS, per_query_metrics

    values = [per_query_metrics(run, qrels) for run in runs]
    query_ids = list(values[0])
    per_query = {m: [[v[q][m] for q in query_ids] for v in values] for m in METRICS}
    unpatched, patched = ({m: float(np.mean(per_query[m][k])) for m in METRICS} | {"queries": len(query_ids)}
                          for k in range(2))
    relative = {m: (patched[m] / unpatched[m] if unpatched[m] else None) for m in METRICS}
    return {"unpatched": unpatched, "patched": patched, "relative": relative,
            "per_query": {"query_ids": query_ids, **per_query}}


def circuit_report(circuit: Circuit, stages: Sequence[Sequence[int]], query_ids: Sequence[str],
                   doc_ids: Sequence[str], rankings: dict, qrels, *, correct_queries: int,
                   padding: str) -> tuple[dict, list]:
    """(``minimal_circuit.json``'s content, the two runs [unpatched, circuit]) from the ranked docids of
    `genir_jax.analysis.circuit_runs.rank_test_queries` (`rankings`: {ranking: (top_ids [2, N, k] into
    `doc_ids`, -1 for a word token; top_logits; ...)}): per ranking (``rankings`` in the file: the full
    vocabulary, as the reference ranks, and the docid tokens only) the retrieval metrics of both, the circuit's
    relative to the unpatched model's and the per-query values; at the top level those of the docid-token
    ranking (the first ranking when it is absent), its runs, and the reference's own metric names."""
    from genir_jax.docids.retrieval import run_from_ranking

    runs_of = {name: [run_from_ranking(query_ids, doc_ids, top_ids[k], top_logits[k]) for k in range(2)]
               for name, (top_ids, top_logits, *_) in rankings.items()}
    measured = {name: measure_runs(runs, qrels) for name, runs in runs_of.items()}
    main = DOCID_TOKENS if DOCID_TOKENS in measured else next(iter(measured))
    primary = measured[main]
    report = {
        "circuit": circuit.as_json(), "config": circuit.describe(stages), "stages": [list(s) for s in stages],
        "unpatched": primary["unpatched"], "patched": primary["patched"], "relative": primary["relative"],
        "queries": len(query_ids), "mean_over_correct_queries": correct_queries, "ranking": f"{main}, {padding}",
        "rankings": measured,
        # the reference's own names
        "hits@1": primary["patched"]["Hits@1"], "hits@10": primary["patched"]["Hits@10"],
        "recall@5": primary["patched"]["Recall@5"],
    }
    return report, runs_of[main]
