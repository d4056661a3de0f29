"""Which of the paper's claims hold at this scale: each claim's statistic with its 95% bootstrap interval over
queries, and a verdict computed from the interval by `genir_jax.analysis.evidence.verdict` (never by hand).

The rows read the per-query values the other experiments wrote (Table 3's ranks, Table 4's per-query metrics,
Fig. 4's component-sum ranks, Table 2's swap ranks); a row whose inputs are missing says so. The encoder-swap
claim (an encoder that never saw a document still lets the decoder retrieve it) has a control: the same swap's
queries whose documents the encoder's model DID see. When the control breaks retrieval too (its share at rank 1
lies wholly below `CONTROL_KEPT`), a foreign encoder breaks retrieval whatever it saw, and the claim is "not
testable at this scale" (computed from the control's interval, not written by hand).
"""

from __future__ import annotations

import collections
import json

import numpy as np

from genir_jax.analysis.evidence import DOES_NOT_HOLD, HOLDS, VERDICT_RULE, Claim, bootstrap, ratio, share, verdict
from genir_jax.paper.panels import BOTH_FAMILIES, DECODER, EXPERIMENT_JSON, Experiment, Section, md_table, read_json

NOT_TESTABLE = "not testable at this scale"
CONTROL_KEPT = 0.5   # the control breaks retrieval when its share of queries at rank 1 lies wholly below this
WIDEST = 0.3         # an interval wider than 30 points decides nothing (`Claim.max_width`)

# Table 3 (zero ablation, % of correct queries that leave rank 1): (component, stage, paper %, the claim's side
# of its threshold, threshold, the claim in words)
STAGE_CLAIMS = (
    ("attn", 0, 1.52, "below", 0.10, "Decoder self-attention is dispensable (stage I)"),
    ("attn", 1, 2.27, "below", 0.10, "Decoder self-attention is dispensable (stage II)"),
    ("attn", 2, 6.57, "below", 0.10, "Decoder self-attention is dispensable (stage III)"),
    ("mlp", 0, 92.86, "above", 0.50, "Stage-I MLPs prime the decoder (needed)"),
    ("mlp", 2, 96.72, "above", 0.50, "Stage-III MLPs are needed (the interaction stage)"),
    ("cross_attn", 1, 21.72, "above", 0.10, "Cross-attention of stage II matters"),
    ("cross_attn", 2, 39.65, "above", 0.10, "Cross-attention of stage III matters"),
)


class ClaimRow(tuple):
    """A claims-table row (its five cells) that keeps what its verdict came from: the interval (unscaled, with
    its observations), the claim, the unit of the cell, an encoder swap's control interval and the name of its
    model (`control_name`), and a fixed note after the verdict; `genir_jax.paper.seeds` pools these over seeds."""

    def __new__(cls, cells, interval, claim: Claim, unit: float, control=None, control_name: str | None = None,
                note: str = ""):
        row = super().__new__(cls, cells)
        row.interval, row.claim, row.unit, row.note = interval, claim, unit, note
        row.control, row.control_name = control, control_name
        return row

    def with_note(self, note: str) -> "ClaimRow":
        """The same row with `note` after its verdict."""
        return ClaimRow(self[:4] + (self[4] + note,), self.interval, self.claim, self.unit, self.control,
                        self.control_name, self.note + note)


def claim_verdict(interval, claim: Claim, control=None) -> str:
    """The verdict by the rule; NOT_TESTABLE when an encoder swap's `control` interval (its share of queries at
    rank 1) lies wholly below `CONTROL_KEPT`: then any foreign encoder breaks retrieval."""
    if control is not None and verdict(control, Claim(threshold=CONTROL_KEPT, side="below")) == HOLDS:
        return NOT_TESTABLE
    return verdict(interval, claim)


def _row(claim_text: str, statistic: str, interval, claim: Claim, paper: str, unit: float = 100,
         control=None, control_name: str | None = None) -> ClaimRow:
    """One claims-table row: the interval (in `unit`s) and its verdict by the rule (see `claim_verdict`); an
    encoder swap's row (`control_name`: its model) says what its control kept after the verdict."""
    side = "" if claim.threshold is None else f"; claim: {claim.side} {unit * claim.threshold:g}"
    judged = claim_verdict(interval, claim, control)
    if control_name is not None:
        judged += control_note(control_name, control)
    return ClaimRow((claim_text, statistic, interval.scaled(unit).format(2), paper + side, judged), interval, claim,
                    unit, control, control_name)


def _missing(claim_text: str, why: str) -> tuple:
    return (claim_text, "", f"not available: {why}", "", "")


def _stage_rows(layout, stage_claims=STAGE_CLAIMS) -> list[tuple]:
    from genir_jax.analysis.stage_patching import RANKS_JSON

    path = layout.analysis("patch-stages") / RANKS_JSON
    if not path.is_file():
        return [_missing(text, "Table 3 has not run") for *_, text in stage_claims]
    ranks = json.loads(path.read_text())
    rows = []
    for component, stage, paper, side, threshold, text in stage_claims:
        values = ranks.get(f"{stage}-{component}-zero")
        if not values:
            rows.append(_missing(text, f"no zero-ablation row for {component} in stage {stage + 1}"))
            continue
        claim = Claim(paper=paper / 100, threshold=threshold, side=side, max_width=WIDEST)
        rows.append(_row(text, "% correct queries off rank 1, zeroed", share(np.asarray(values) != 0), claim,
                         f"{paper:.2f}%"))
    return rows


CIRCUIT_CLAIM = "The minimal circuit keeps the model's effectiveness"
MLP_SUM_CLAIM = "MLP outputs alone keep the docid in the top 10 (rank <= 10)"
CROSS_ATTENTION_SUM_CLAIM = "Cross-attention outputs alone put the docid beyond rank 100"
DOCID_SHARE_CLAIM = "Cross-attention writes words, not document identities (stage II)"
ENCODER_SWAP_CLAIM = "Encoders of DSI models that never saw a document still let the decoder retrieve it"
BASE_ENCODER_CLAIM = "The pretrained T5 encoder swapped in keeps the docids near the top (mean rank 21.66)"


def _circuit_row(layout) -> tuple:
    from genir_jax.analysis.circuit import FULL_VOCABULARY, RESULTS_JSON

    text = CIRCUIT_CLAIM
    path = layout.analysis("circuit") / RESULTS_JSON
    if not path.is_file():
        return _missing(text, "Table 4 has not run")
    report = json.loads(path.read_text())
    measured = report.get("rankings", {}).get(FULL_VOCABULARY)
    if measured is None:
        return _missing(text, "no full-vocabulary ranking (a naive / semantic model, or an older run)")
    hits = measured["per_query"]["Hits@1"]
    interval = ratio(hits[1], hits[0])
    if interval is None:
        return _missing(text, "the unpatched model has Hits@1 0 on the test queries")
    return _row(text, "circuit / unpatched Hits@1 (full vocabulary), %", interval,
                Claim(paper=0.94, threshold=0.9, side="above", max_width=WIDEST), "94%")


def _component_sum_rows(layout, cross_attention: bool = True) -> list[tuple]:
    """The MLP-sum claim and (`cross_attention`: a T5) the cross-attention-sum claim."""
    from genir_jax.analysis.residual import SUMS_CSV
    from genir_jax.paper.experiments.figure4_rank_development import component_sum_ranks

    texts = (MLP_SUM_CLAIM, CROSS_ATTENTION_SUM_CLAIM)[:2 if cross_attention else 1]
    if not (layout.analysis("residual-rank") / SUMS_CSV).is_file():
        return [_missing(text, "Fig. 4 has not run") for text in texts]
    ranks = component_sum_ranks(layout)
    rows = [_row(texts[0], "% correct queries with the docid beyond rank 10", share(ranks["mlp"] > 10),
                 Claim(paper=0.0, threshold=0.10, side="below", max_width=WIDEST), "0% (33% leave rank 1)")]
    if cross_attention:
        rows.append(_row(texts[1], "% correct queries with the docid beyond rank 100", share(ranks["cross_attn"] > 100),
                         Claim(paper=1.0, threshold=0.90, side="above", max_width=WIDEST), "100%"))
    return rows


def _docid_share_row(layout) -> tuple:
    from genir_jax.paper.experiments.table5_crattn_docid_share import PAPER_STAGE, per_query_shares

    text = DOCID_SHARE_CLAIM
    if not (layout.analysis("crattn-writes") / f"per_q_averages_s{PAPER_STAGE}.json").is_file():
        return _missing(text, "Table 5 has not run (or the model has no stage II)")
    return _row(text, "% docids among the top 10 tokens of its logit lens", bootstrap(
        per_query_shares(layout, PAPER_STAGE, "10")), Claim(paper=0.0, threshold=0.05, side="below",
                                                             max_width=WIDEST), "0.00%")


def swap_ranks(values: dict, queries: int) -> np.ndarray:
    """Every correct query's rank with a swapped-in encoder, from swapped_encoder.json's entry (its non-zero
    ranks and, for the others, rank 0; the order does not matter for the statistics)."""
    nonzero = [int(r) for r in values["Non 0 ranks"]]
    return np.asarray(nonzero + [0] * (queries - len(nonzero)), dtype=np.int64)


def control_ranks(values: dict, queries: int) -> np.ndarray:
    """The control of an encoder swap: the ranks of the correct queries whose documents the encoder's model
    saw (every rank but those of its removed documents' queries)."""
    left = collections.Counter(swap_ranks(values, queries).tolist())
    left.subtract(int(r) for r in values.get("missing_ranks", []))
    return np.asarray(sorted(left.elements()), dtype=np.int64)


def control_note(name: str, kept, n: str | None = None) -> str:
    """What an encoder-swap row says of its control (the share of its queries at rank 1; `n` as in
    `Interval.format`)."""
    control_text = "no control queries" if kept is None else kept.scaled(100).format(2, n=n)
    return f" (control: the queries of documents {name} saw, % at rank 1: {control_text})"


def encoder_swap_rows(layout) -> list[tuple]:
    """The encoder-swap claim per removed-documents model, judged only where its control keeps retrieval."""
    text = ENCODER_SWAP_CLAIM
    directory = layout.analysis("swap-encoder")
    if not (directory / "swapped_encoder.json").is_file() or not (directory / EXPERIMENT_JSON).is_file():
        return [_missing(text, "Table 2 has not run")]
    results = read_json(directory / "swapped_encoder.json")
    queries = read_json(directory / EXPERIMENT_JSON)["queries"]
    removed = read_json(layout.removed_documents) if layout.removed_documents.is_file() else {}
    rows = []
    for key, values in results.items():
        name = next((label for label in removed if key.rstrip("/").endswith(label)), None)
        if name is None:
            continue  # the base T5's encoder: its own row
        missing = values.get("missing_ranks") or []
        if not missing:
            rows.append(_missing(f"{text} ({name})", "no correct query of a removed document"))
            continue
        claim = Claim(threshold=0.5, side="above", max_width=WIDEST)
        control = control_ranks(values, queries)
        kept = share(control == 0) if control.size else None
        row = _row(f"{text} ({name})", "% removed documents' correct queries at rank 1", share(np.asarray(missing) == 0),
                   claim, "most (Table 2)", control=kept, control_name=name)
        rows.append(row)
    return rows or [_missing(text, "no removed-documents model in swapped_encoder.json")]


def _base_encoder_row(layout, settings_base: bool) -> tuple:
    text = BASE_ENCODER_CLAIM
    directory = layout.analysis("swap-encoder")
    if not (directory / "swapped_encoder.json").is_file() or not (directory / EXPERIMENT_JSON).is_file():
        return _missing(text, "Table 2 has not run")
    results = read_json(directory / "swapped_encoder.json")
    removed = read_json(layout.removed_documents) if layout.removed_documents.is_file() else {}
    base = [values for key, values in results.items() if not any(key.rstrip("/").endswith(l) for l in removed)]
    if not base:
        return _missing(text, "no base-encoder swap")
    ranks = swap_ranks(base[0], read_json(directory / EXPERIMENT_JSON)["queries"])
    row = _row(text, "mean rank of the correct queries (0-based)", bootstrap(ranks), Claim(paper=21.66,
               max_width=np.inf), "21.66", unit=1)
    return row if settings_base else row.with_note(" (not comparable: our base is not a pretrained T5; "
                                                   "`--base` makes it comparable)")


def claim_rows(layout, base_given: bool = False, decoder: bool = False) -> list[tuple]:
    """Every row of the claims table: a `ClaimRow`, or a plain tuple where its inputs are missing. `decoder`: a
    decoder-only run, whose rows are the claims its experiments decide (self-attention and MLP stage patching,
    the MLP-sum logit lens), by the same rule; the others are `decoder_omitted_claims`."""
    if decoder:
        return [*_stage_rows(layout, [claim for claim in STAGE_CLAIMS if claim[0] != "cross_attn"]),
                *_component_sum_rows(layout, cross_attention=False)]
    return [*_stage_rows(layout), _circuit_row(layout), _docid_share_row(layout), *_component_sum_rows(layout),
            *encoder_swap_rows(layout), _base_encoder_row(layout, base_given)]


def decoder_omitted_claims() -> list[str]:
    """The claims a decoder-only run leaves out: they need an encoder or cross-attention, or the paper's minimal
    circuit (experiments that do not run on decoder-only models)."""
    return [*(claim[-1] for claim in STAGE_CLAIMS if claim[0] == "cross_attn"), CIRCUIT_CLAIM, DOCID_SHARE_CLAIM,
            CROSS_ATTENTION_SUM_CLAIM, ENCODER_SWAP_CLAIM, BASE_ENCODER_CLAIM]


def decoder_omitted_note() -> str:
    return ("Omitted for decoder-only models (their experiments need an encoder or cross-attention, or are the "
            "paper's minimal circuit; see \"Not applicable to decoder-only models\"): "
            + "; ".join(decoder_omitted_claims()) + ".\n")


CLAIMS_HEADERS = ("the paper's claim (NQ10k, T5-large)", "statistic", "ours [95% CI] (n)", "paper; the claim's side",
                  "verdict")


def render_claims(layout, base_given: bool = False, decoder: bool = False) -> str:
    text = md_table(CLAIMS_HEADERS, claim_rows(layout, base_given, decoder))
    text += "\n\n" + RULE_NOTE
    return text + ("\n" + decoder_omitted_note() if decoder else "")


RULE_NOTE = (f"Verdicts by one rule: {VERDICT_RULE}; an interval wider than {100 * WIDEST:.0f} points is "
             "undetermined. Intervals: 95% bootstrap over queries, n queries. "
             f"The encoder-swap claim is {NOT_TESTABLE!r} when its control (the same swap on the queries of "
             f"documents the encoder's model saw) keeps less than {100 * CONTROL_KEPT:.0f}% of them at rank 1 "
             "(interval wholly below): then any foreign encoder breaks retrieval. Why a claim fails here is not "
             "measured: model size and training length, the base model and the docid scheme are hypotheses "
             f"(see docs/results.md). Values: {HOLDS!r}, {DOES_NOT_HOLD!r}, 'undetermined'.\n")


def render(layout) -> Section:
    settings = layout.steps / "settings.json"
    record = read_json(settings) if settings.is_file() else {}
    return Section(render_claims(layout, bool(record.get("base")), record.get("model_type") == DECODER))


EXPERIMENT = Experiment(
    id="claims", title="Which of the paper's claims hold at this scale", paper_ref="verdicts from intervals",
    position=99, command="genir-jax reproduce (the report)", paper={}, render=render, families=BOTH_FAMILIES,
)
