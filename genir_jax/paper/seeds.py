"""The report of a multi-seed reproduction (`genir-jax reproduce --seeds N`): each statistic per training seed
and pooled over the seeds, in ``OUT/report.md`` and ``OUT/report.json``.

The statistics: Table 1's retrieval metrics of the full model (test queries, and Hits@1 on the validation
queries) and every row of the claims table (`genir_jax.paper.experiments.claims`). Per seed, a cell is the
one of that seed's own report (``seed-<s>/report.md``, which has every table and figure); pooled, it is the
same statistic over the per-query observations of every seed concatenated, with its 95% interval from the
same bootstrap over (seed, query) pairs (`genir_jax.analysis.evidence.pool`), and n written as seeds x queries
(or as the sum of each seed's queries where they differ: the correct queries are each model's own). The
pooled claims are judged by the claims table's rule, and a line per claim says whether the seeds' verdicts
agree.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping, Sequence

from genir_jax.analysis.evidence import BESIDE_NOTE, RESAMPLES, SEED, Interval, pool
from genir_jax.base.io import write_json, write_text
from genir_jax.paper.panels import md_table, step_record

REPORT_JSON = "report.json"
NOT_AVAILABLE = "not available"


def pooled_n(intervals: Sequence[Interval]) -> str:
    """The n of a pooled statistic: ``"2x100"`` (seeds x queries), or ``"40+60"`` when the seeds' counts differ."""
    counts = [interval.queries for interval in intervals]
    return f"{len(counts)}x{counts[0]}" if len(set(counts)) == 1 else "+".join(str(count) for count in counts)


def pooled_cell(interval: Interval | None, intervals: Sequence[Interval], unit: float) -> str:
    """A pooled statistic's cell: its estimate and interval in `unit`s, n as `pooled_n`."""
    return NOT_AVAILABLE if interval is None else interval.scaled(unit).format(2, n=pooled_n(intervals))


@dataclasses.dataclass(frozen=True)
class SeedStatistic:
    """One statistic across the seeds: per seed its interval (None where that seed has none), in `unit`s."""

    name: str
    per_seed: Mapping[int, Interval | None]
    unit: float = 100

    @property
    def pooled(self) -> Interval | None:
        """The statistic over every seed's queries (None unless every seed has it)."""
        intervals = list(self.per_seed.values())
        return pool(intervals) if intervals and all(intervals) else None

    def cells(self) -> list[str]:
        """Each seed's cell, as its own report writes it, then the pooled one."""
        own = [NOT_AVAILABLE if interval is None else interval.scaled(self.unit).format(2)
               for interval in self.per_seed.values()]
        return own + [pooled_cell(self.pooled, list(self.per_seed.values()), self.unit)]

    def record(self) -> dict:
        pooled = self.pooled
        return {"statistic": self.name, "unit": self.unit,
                "per_seed": {str(seed): None if interval is None else interval.record()
                             for seed, interval in self.per_seed.items()},
                "pooled": None if pooled is None else pooled.record() | {"n": pooled_n(list(self.per_seed.values()))}}


def retrieval_statistics(layouts: Mapping[int, object]) -> list[SeedStatistic]:
    """Table 1's statistics per seed: the full model's test metrics and its validation Hits@1 (percentages)."""
    from genir_jax.analysis.evidence import run_intervals
    from genir_jax.paper.experiments.table1_retrieval import METRICS

    def intervals(layout, directory, split) -> dict:
        run = directory / "run.trec"
        return run_intervals(run, layout.qrels(split)) if run.is_file() else {}

    test = {seed: intervals(layout, layout.eval_test, "test") for seed, layout in layouts.items()}
    val = {seed: intervals(layout, layout.eval_val, "val") for seed, layout in layouts.items()}
    rows = [SeedStatistic(f"DSI {metric} (test), %", {seed: test[seed].get(metric) for seed in layouts})
            for metric in METRICS]
    return rows + [SeedStatistic("DSI Hits@1 (validation), %", {seed: val[seed].get("Hits@1") for seed in layouts})]


@dataclasses.dataclass(frozen=True)
class SeedClaim:
    """One claim of the claims table across the seeds: each seed's row (a `ClaimRow`, or a plain tuple where
    its inputs are missing)."""

    text: str
    rows: Mapping[int, tuple]

    def seed_verdicts(self) -> dict[int, str]:
        """Each seed's verdict by the rule (without the row's notes), or 'not available'."""
        from genir_jax.paper.experiments.claims import claim_verdict

        return {seed: claim_verdict(row.interval, row.claim, row.control) if hasattr(row, "interval")
                else NOT_AVAILABLE for seed, row in self.rows.items()}

    @property
    def agree(self) -> bool | None:
        """Whether every seed's verdict is the same (None when no seed has the statistic)."""
        verdicts = set(self.seed_verdicts().values())
        return None if verdicts == {NOT_AVAILABLE} else len(verdicts) == 1

    def pooled(self) -> tuple[Interval | None, str]:
        """The claim's statistic pooled over the seeds and its verdict by the rule (with an encoder swap's
        control pooled too); (None, 'not available') unless every seed has the statistic."""
        from genir_jax.paper.experiments.claims import claim_verdict, control_note

        rows = list(self.rows.values())
        if not all(hasattr(row, "interval") for row in rows):
            return None, NOT_AVAILABLE
        interval, first = pool([row.interval for row in rows]), rows[0]
        controls = [row.control for row in rows if row.control is not None]
        control = pool(controls) if controls else None
        judged = NOT_AVAILABLE if interval is None else claim_verdict(interval, first.claim, control)
        if first.control_name is not None:
            judged += control_note(first.control_name, control, n=pooled_n(controls) if controls else None)
        return interval, judged + first.note

    def cells(self) -> list[str]:
        """The statistic, each seed's cell as its report writes it, the pooled cell, the paper, the verdict."""
        rows = list(self.rows.values())
        described = next((row for row in rows if hasattr(row, "interval")), rows[0])
        interval, judged = self.pooled()
        pooled = NOT_AVAILABLE if interval is None else pooled_cell(
            interval, [row.interval for row in rows], described.unit)
        return [described[1], *(row[2] for row in rows), pooled, described[3], judged]

    def agreement_line(self) -> str:
        verdicts = "; ".join(f"seed {seed}: {verdict}" for seed, verdict in self.seed_verdicts().items())
        if self.agree is None:
            return f"- {self.text}: not available in any seed"
        return f"- {self.text}: the seeds {'agree' if self.agree else 'DISAGREE'} ({verdicts})"

    def record(self) -> dict:
        interval, judged = self.pooled()
        return {"claim": self.text, "per_seed": {str(seed): {"cell": row[2], "verdict": verdict}
                                                 for (seed, row), verdict in zip(self.rows.items(),
                                                                                 self.seed_verdicts().values())},
                "pooled": None if interval is None else interval.record(), "pooled_verdict": judged,
                "seeds_agree": self.agree}


def seed_claims(rows_per_seed: Mapping[int, Sequence[tuple]]) -> list[SeedClaim]:
    """The claims of every seed's claims table, matched by their text (in the first seed's order); a claim a
    seed lacks is 'not available' there."""
    texts: list[str] = []
    for rows in rows_per_seed.values():
        texts += [row[0] for row in rows if row[0] not in texts]
    by_text = {seed: {row[0]: row for row in rows} for seed, rows in rows_per_seed.items()}
    return [SeedClaim(text, {seed: by_text[seed].get(text, (text, "", NOT_AVAILABLE, "", ""))
                             for seed in rows_per_seed}) for text in texts]


def render_pooled(seeds: Sequence[int], retrieval: Sequence[SeedStatistic], claims: Sequence[SeedClaim],
                  title: str, intro: Sequence[str] = ()) -> str:
    """The pooled report's markdown: the retrieval table, then the claims table and a line per claim."""
    from genir_jax.paper.experiments.claims import RULE_NOTE

    per_seed = [f"seed {seed} [95% CI] (n)" for seed in seeds]
    lines = [f"# {title}", "", *intro]
    lines += ["## Retrieval effectiveness (Table 1), per seed and pooled", "",
              md_table(["statistic", *per_seed, "pooled [95% CI] (n=seeds x queries)"],
                       [(statistic.name, *statistic.cells()) for statistic in retrieval]), ""]
    lines += ["## Which of the paper's claims hold, per seed and pooled", "",
              md_table(["the paper's claim (NQ10k, T5-large)", "statistic", *per_seed,
                        "pooled [95% CI] (n=seeds x queries)", "paper; the claim's side", "pooled verdict"],
                       [(claim.text, *claim.cells()) for claim in claims]), "",
              "Do the seeds agree? Each seed's verdict, by the same rule, on its own queries:", "",
              *(claim.agreement_line() for claim in claims), "", RULE_NOTE]
    return "\n".join(lines)


def write_pooled_report(layout, settings, layouts: Mapping[int, object], pipeline: Sequence = ()) -> pathlib.Path:
    """``report.md`` and ``report.json`` of a multi-seed run in `layout` (its root), from the seeds' folders
    `layouts` (seed -> `genir_jax.paper.reproduce.SeedLayout`); `pipeline`: the steps each seed runs."""
    from genir_jax.paper.experiments.claims import claim_rows

    seeds = list(layouts)
    retrieval = retrieval_statistics(layouts)
    claims = seed_claims({seed: claim_rows(seeded, bool(settings.base), settings.model_type == "decoder") for seed, seeded in layouts.items()})
    state = [(f"[seed-{seed}/report.md](seed-{seed}/report.md)", *_progress(seeded, pipeline))
             for seed, seeded in layouts.items()]
    intro = [
        f"Reusch & Belinkov (SIGIR 2025) re-run with genir-jax on {settings.dataset}, preset {settings.preset}, "
        f"docids {settings.docids}, with {len(seeds)} DSI training seeds: {', '.join(map(str, seeds))}. A seed sets "
        "the docid tokens' initial embeddings, the batch order and the dropout of the full model and of the "
        "models without some documents; each seed's models, evaluations and analyses are in its folder, with its "
        "own report (every table and figure). Shared by every seed, as they do not depend on it: the prepared "
        "data (`data/`, its split fixed) and the base T5 (" + (f"`{settings.base}`, `--base`" if settings.base else
                                                               "`models/base/`, pretrained once") + ").", "",
        md_table(["seed's report", "steps done", "of", "seconds"], state), "",
        "Pooled: every statistic over the per-query observations of all seeds together, its 95% interval a "
        f"percentile bootstrap over (seed, query) pairs ({RESAMPLES:,} resamples, seed {SEED}; "
        "`genir_jax.analysis.evidence.pool`); n = seeds x queries (a sum where the seeds' query counts differ: "
        "the correct queries are each model's own). Pooling treats the pairs as exchangeable; how far the seeds "
        "differ is in their own columns. " + BESIDE_NOTE, ""]
    title = f"genir-jax reproduction over {len(seeds)} seeds: {settings.dataset}, preset {settings.preset}"
    write_text(layout.report, render_pooled(seeds, retrieval, claims, title, intro))
    write_json(layout.root / REPORT_JSON, {"seeds": seeds, "retrieval": [s.record() for s in retrieval],
                                           "claims": [claim.record() for claim in claims]}, indent=2)
    return layout.report


def _progress(layout, pipeline: Sequence) -> tuple[int, int, str]:
    """How many of a seed's steps (`pipeline`) are recorded, of how many, and their seconds."""
    records = [record for record in (step_record(layout, step.name) for step in pipeline) if record]
    return len(records), len(pipeline), f"{sum(float(record.get('seconds', 0)) for record in records):.0f}"
