"""Table 4: the minimal circuit on the test queries, absolute and relative to the unpatched model."""

import dataclasses

import numpy as np

from genir_jax.paper.panels import Experiment, Section, md_table, percent, read_json, record_settings

from genir_jax.paper.experiments._common import correct_inputs, correct_sequence_inputs, full_scheme, resolve_stages

PAPER = {"Hits@1": (38.0, 94), "Recall@5": (56.9, 98), "Hits@10": (62.0, 97)}


@dataclasses.dataclass(frozen=True)
class Config:
    stages: str | None = None      # None: the paper's for a 24-layer decoder, else auto (as circuit)
    k: int = 100                   # documents per query in the runs
    batch_size: int | None = None  # queries per device per step (None: from a logits budget)


def run_circuit(layout, settings, config: Config) -> dict:
    """The paper's minimal circuit (`genir_jax.analysis.circuit`) on the test queries, means over the correct
    validation queries, ranked over the full vocabulary (as the reference) and over the docid tokens only;
    writes what `genir-jax circuit` writes."""
    from genir_jax.analysis.circuit import PAPER_CIRCUIT, circuit_report, docid_targets
    from genir_jax.analysis.circuit_runs import rank_test_queries
    from genir_jax.data.corpus import read_qrels, read_queries
    from genir_jax.docids.retrieval import check_run_covers

    if full_scheme(layout).multi_token:
        return _run_sequence_circuit(layout, settings, config)
    inputs = correct_inputs(layout)
    test_queries = read_queries(layout.queries("test"))
    qrels = read_qrels(layout.qrels("test"))
    check_run_covers([q.id for q in test_queries], qrels, str(layout.qrels("test")))
    stages, stages_record, inputs = resolve_stages(config.stages, inputs, settings.progress)
    docids = docid_targets(inputs.model.tokenizer, test_queries, layout.queries("test"), layout.full)
    circuit = PAPER_CIRCUIT
    rankings = rank_test_queries(inputs, test_queries, circuit, stages, docids, k=config.k,
                                 batch_size=config.batch_size, progress=settings.progress)
    report, runs = circuit_report(circuit, stages, [q.id for q in test_queries], docids.doc_ids, rankings, qrels,
                                  correct_queries=len(inputs.queries), padding="masked padding")
    return _write_circuit(layout, config, report, runs, stages, stages_record, test_queries=len(test_queries))


def _write_circuit(layout, config: Config, report: dict, runs, stages, stages_record: dict, **used) -> dict:
    """What `genir-jax circuit` writes (the report, stages.json, both runs), then experiment.json."""
    from genir_jax.analysis.circuit_runs import write_circuit

    output = layout.analysis("circuit")
    write_circuit(output, report, runs, stages_record, "full")
    return record_settings(output, "table4", config, checkpoint=layout.full, stages=stages,
                           stages_method=stages_record["method"], **used)


def _run_sequence_circuit(layout, settings, config: Config) -> dict:
    """The paper's circuit on a naive / semantic model, on the test queries: beam search (10 beams over the
    docid trie) without and with the circuit patched at every decoding step -> retrieval metrics as for
    atomic docids; and each query's relevant docid teacher-forced without and with the circuit -> each
    step's rank (first-step, per-step and every-step shares at rank 0; every step: greedy Hits@1) and the
    log-probabilities (`analysis.circuit.sequence_circuit_report`). Means are per decoder
    position over the correct validation queries' teacher-forced docids."""
    from genir_jax.analysis.circuit import PAPER_CIRCUIT, circuit_interventions, sequence_circuit_report
    from genir_jax.analysis.inputs import tokenize_for_analysis
    from genir_jax.data.corpus import read_qrels, read_queries
    from genir_jax.docids.schemes import docid_token_sequences, docid_trie
    from genir_jax.interp.interventions import mean_activations
    from genir_jax.interp.patching import run_sweep
    from genir_jax.docids.retrieval import check_run_covers, rank_docid_sequences
    from genir_jax.docids.sequence_targets import pad_targets, teacher_forced_step_ranks, teacher_forcing_inputs
    from genir_jax.core.sites import ALL_LAYERS, COMPONENTS, component_site

    inputs = correct_sequence_inputs(layout)
    stages, stages_record, inputs = resolve_stages(config.stages, inputs, settings.progress)
    model, tokenizer, scheme = inputs.model, inputs.model.tokenizer, inputs.scheme
    source = str(layout.full / "docids.json")
    test_queries = read_queries(layout.queries("test"))
    qrels = read_qrels(layout.qrels("test"))
    check_run_covers([q.id for q in test_queries], qrels, str(layout.qrels("test")))
    doc_ids = list(scheme.docids)
    trie = docid_trie(scheme, tokenizer, doc_ids, source)
    sequences = docid_token_sequences(scheme, tokenizer, [q.relevant_docs[0] for q in test_queries], source)
    width = max(trie.max_docid_length, inputs.targets.shape[1])  # every decoding step and every docid
    val_targets, _ = pad_targets([q.tokens for q in inputs.queries], width)
    targets, target_mask = pad_targets(sequences, width)
    circuit = PAPER_CIRCUIT
    means = mean_activations(model.config, model.params, inputs.input_ids, inputs.attention_mask,
                             [component_site("decoder", c, ALL_LAYERS) for c in COMPONENTS],
                             decoder_input_ids=teacher_forcing_inputs(val_targets, model.config.decoder_start_token_id),
                             progress=settings.progress) if any(p.mode == "mean" for p in circuit.patches) else None
    sweep = circuit_interventions(model.config, circuit, stages, means)
    ids, mask = tokenize_for_analysis(tokenizer, [q.text for q in test_queries])
    ranked = [rank_docid_sequences(model.config, model.params, ids, mask, trie, num_beams=10,
                                   batch_size=config.batch_size or 32, progress=settings.progress,
                                   interventions=sweep.config(model.config, k) or None)[:2] for k in range(2)]
    result = run_sweep(model.config, model.params, ids, mask, targets, sweep, target_mask=target_mask,
                       metrics=("logprob",), query_chunk=config.batch_size, progress=settings.progress)
    steps = np.stack([teacher_forced_step_ranks(model.config, model.params, ids, mask, targets, target_mask,
                                                interventions=sweep.config(model.config, k) or None,
                                                batch_size=config.batch_size or 32) for k in range(2)])
    report, runs = sequence_circuit_report(
        circuit, stages, [q.id for q in test_queries], doc_ids, [r[0] for r in ranked], [r[1] for r in ranked], qrels,
        steps, result.values["logprob"], correct_queries=len(inputs.queries), scheme=scheme.name)
    return _write_circuit(layout, config, report, runs, stages, stages_record, test_queries=len(test_queries),
                          docids=scheme.name)


def render(layout) -> Section:
    report = read_json(layout.analysis("circuit") / "minimal_circuit.json")
    if report.get("docids", "atomic") != "atomic":
        return _render_sequences(report)
    text = _metric_table(report, ("Hits@1", "Recall@5", "Hits@10", "MRR@10"))
    text += (f"\n\nCircuit: {report['config']} (means over {report['mean_over_correct_queries']} correct validation "
             f"queries; {report['queries']} test queries). Two rankings: over the **full vocabulary**, as the "
             "reference ranks (a word token above the relevant docid counts as a non-relevant entry: a circuit "
             "that removes the priming MLPs may let words rise), and over the **docid tokens only** (as "
             f"`genir-jax evaluate`). {INTERVALS_NOTE}\n")
    return Section(text)


INTERVALS_NOTE = "Intervals: 95% bootstrap over the test queries, n queries (the ratio resamples them in pairs)."


def _metric_table(report: dict, metrics) -> str:
    """One row per ranking and metric: unpatched, circuit and their ratio, each with its interval over queries,
    beside the paper's (the paper ranks the full vocabulary)."""
    from genir_jax.analysis.evidence import bootstrap, ratio

    rows = []
    for ranking, measured in report.get("rankings", {report.get("ranking", "docid tokens only"): report}).items():
        per_query = measured.get("per_query", {})
        for metric in metrics:
            paper = PAPER.get(metric)
            values = per_query.get(metric)
            if values is None:  # a record without per-query values: no interval
                relative = measured["relative"].get(metric)
                cells = (f"{percent(measured['unpatched'][metric]):.2f}", f"{percent(measured['patched'][metric]):.2f}",
                         None if relative is None else f"{100 * relative:.0f}%")
            else:
                relative = ratio(values[1], values[0])
                cells = (bootstrap(values[0]).scaled(100).format(2), bootstrap(values[1]).scaled(100).format(2),
                         "no ratio (unpatched 0)" if relative is None else relative.scaled(100).format(0, "%"))
            rows.append((ranking, metric, *cells, None if paper is None else f"{paper[0]:.1f} ({paper[1]}%)"))
    return md_table(["ranking", "metric", "unpatched [95% CI]", "circuit [95% CI]", "circuit / unpatched [95% CI]",
                     "paper: circuit (relative)"], rows)


def _render_sequences(report: dict) -> Section:
    from genir_jax.analysis.evidence import bootstrap, share
    from genir_jax.docids.sequence_targets import kept_at_rank_0

    beams = {**report, "per_query": report.get("retrieval_per_query", {})}
    text = _metric_table({"rankings": {"beam search over the docid trie": beams}},
                         ("Hits@1", "Recall@5", "Hits@10", "MRR@10"))
    per_query = report["per_query"]
    rows = []
    for k, name in enumerate(("unpatched", "circuit")):
        kept = kept_at_rank_0(per_query["step_ranks"][k])
        rows.append((name, *(share(flags).scaled(100).format(1, "%") for flags in
                             (kept["first step"], *kept["steps"], kept["every step"])),
                     bootstrap(per_query["logprob"][k]).format(3)))
    width = len(rows[0]) - 4  # model, first step, the steps, every step, log-probability
    text += ("\n\nThe relevant docid teacher-forced (gold prefix), without and with the circuit at every decoder "
             "position: % of test queries whose docid token keeps rank 1 (0-based rank 0) at the first decoding "
             "step (the atomic-like view), at each step t (over the queries whose docid has a step t) and at every "
             "step (greedy decoding reproduces the docid exactly: greedy Hits@1), and the mean log-probability of "
             "the docid:\n\n")
    text += md_table(["model", "first step", *(f"step {t + 1}" for t in range(width)), "every step (greedy Hits@1)",
                      "mean log-probability"], rows)
    text += (f"\n\n{report['docids'].capitalize()} docids, {report['queries']} test queries; retrieval by beam search "
             "(10 beams over the docid trie) without and with the circuit patched at every decoding step. The "
             "paper's values are for atomic docids. Circuit: "
             f"{report['config']} (means per decoder position over {report['mean_over_correct_queries']} correct "
             f"validation queries). {INTERVALS_NOTE}\n")
    return Section(text)


EXPERIMENT = Experiment(
    id="table4", title="Minimal circuit", paper_ref="Table 4", position=50,
    command="genir-jax circuit", paper=PAPER, render=render, config=Config(), runs={"circuit": run_circuit},
    docids=("atomic", "naive", "semantic"), not_applicable=("minimal-circuit",),
)
