"""Table 3: % of correct queries whose relevant docid leaves rank 1 when a component type is patched in a stage."""

import csv
import dataclasses


from genir_jax.analysis.stages import describe_stages, stage_names
from genir_jax.paper.panels import BOTH_FAMILIES, DECODER, Experiment, Section, md_table, record_settings

from genir_jax.paper.experiments._common import (correct_inputs, correct_sequence_inputs, full_scheme, load_model,
                                                 stages_of)

PAPER = {  # NQ10k, % of correct queries no longer at rank 1, stages I / II / III
    ("zero", "mlp"): (92.86, 7.83, 96.72), ("zero", "cross_attn"): (4.29, 21.72, 39.65),
    ("zero", "attn"): (1.52, 2.27, 6.57), ("mean", "mlp"): (0.76, 5.56, 48.23),
    ("mean", "cross_attn"): (4.55, 20.45, 42.93), ("t5", "mlp"): (5.30, 7.07, 74.49),
    ("t5", "cross_attn"): (7.58, 17.93, 34.09),
}


@dataclasses.dataclass(frozen=True)
class Config:
    modes: tuple[str, ...] = ("zero", "mean", "t5")  # t5: the base T5's outputs (reproduce's base_model)
    stages: str | None = None      # None: the paper's for a 24-layer decoder, else auto (as patch-stages)
    batch_size: int | None = None  # queries per device per step (None: from a logits budget)
    # naive / semantic docids: the docid's rank is each token's rank at its step given the gold prefix
    # (teacher forcing), reduced per query by max (0 iff greedy decoding still gives the docid) or first
    rank_reduction: str = "max"


def decoder_only_modes(config: Config) -> tuple[str, ...]:
    """The modes a decoder-only run patches: no T5 mode (there is no pretrained T5 decoder to patch from)."""
    return tuple(mode for mode in config.modes if mode != "t5")


def run_patch_stages(layout, settings, config: Config) -> dict:
    """Each component type patched in each stage, every mode, on the correct validation queries
    (`genir_jax.analysis.patch_stages`, as `genir-jax patch-stages`); T5 mode takes the base T5's outputs;
    naive / semantic models run the teacher-forced variant, ranks reduced by `config.rank_reduction`; decoder-only
    models (`--model-type decoder`) their attn and mlp rows in zero and mean mode (T5 mode needs a T5 decoder).
    Writes what `genir-jax patch-stages` writes (CSV, ranks, stages.json)."""
    from genir_jax.analysis.patch_stages import patch_stages, write_patch_stages
    from genir_jax.analysis.stages import resolve_for_inputs
    from genir_jax.paper.panels import base_model

    decoder = getattr(settings, "model_type", None) == DECODER
    config = dataclasses.replace(config, modes=decoder_only_modes(config)) if decoder else config
    base_path = base_model(layout, settings) if "t5" in config.modes else None
    base = load_model(base_path, tokenizer=False) if base_path else None  # a bad base fails before the analysis
    sequences = full_scheme(layout).multi_token
    inputs = correct_sequence_inputs(layout) if sequences else correct_inputs(layout)
    stages, inputs = resolve_for_inputs(config.stages, inputs, progress=settings.progress)
    modes = [m for m in config.modes if m != "t5" or base is not None]
    result = patch_stages(inputs, stages, modes, base=base, base_name=str(base_path),
                          batch_size=config.batch_size, rank_reduction=config.rank_reduction,
                          progress=settings.progress)
    output = layout.analysis("patch-stages")
    write_patch_stages(output, result, stages)
    details = dict(docids=inputs.scheme.name, metric="step_rank", rank_reduction=config.rank_reduction) \
        if sequences else {}
    return record_settings(output, "table3", config, checkpoint=layout.full, t5=base_path, stages=stages.as_lists(),
                           stages_method=stages.method, queries=len(inputs.queries), **details)


RANKS_NOTE = ("Ranks count from 0 in our files, as in the reference code (rank 0 = first). \"Not at rank 1\" is "
              "rank != 0 (the reference's `!=0`); the reference's thresholds `>5`, `>10`, `>100` apply to the 0-based "
              "rank, so they count the queries whose relevant document is not in the top 6, 11 and 101 (counting "
              "from 1).")
DEEPER = ((">5", "% not in top 6 (rank > 5)"), (">10", "% not in top 11 (rank > 10)"),
          (">100", "% not in top 101 (rank > 100)"))


def _docid_note(layout) -> str:
    """For a naive / semantic model: what "rank" means over a multi-token docid (the paper's rows are atomic)."""
    from genir_jax.paper.panels import EXPERIMENT_JSON, read_json

    path = layout.analysis("patch-stages") / EXPERIMENT_JSON
    record = read_json(path) if path.is_file() else {}
    scheme = record.get("docids", "atomic")
    if scheme == "atomic":
        return ""
    how = {"max": "its worst step (rank 0 = greedy decoding still gives the whole docid)",
           "first": "its first step (the first docid token)"}[record.get("rank_reduction", "max")]
    return (f"**{scheme.capitalize()} docids** ({record.get('queries', '?')} correct queries: greedy decoding gives "
            "their relevant docid exactly). Each configuration patches the component at every decoder position of "
            "the teacher-forced docid (gold prefix); a query's rank is each docid token's 0-based rank in the full "
            f"vocabulary at its step, taken at {how}. The paper's values are for ATOMIC docids (one decoding "
            "step); they are shown for orientation, not as a like-for-like comparison.\n\n")


def _step_shares(layout, names) -> str:
    """Multi-token docids: per configuration, the share of correct queries whose docid token keeps rank 0 at the
    first decoding step, at each step and at every step (greedy decoding still gives the docid), with
    intervals; empty for atomic docids (no step_ranks.json)."""
    import json

    from genir_jax.analysis.evidence import share
    from genir_jax.analysis.stage_patching import STEP_RANKS_JSON
    from genir_jax.docids.sequence_targets import kept_at_rank_0

    path = layout.analysis("patch-stages") / STEP_RANKS_JSON
    if not path.is_file():
        return ""
    per_row = json.loads(path.read_text())
    width = max((len(query) for queries in per_row.values() for query in queries), default=0)
    rows = []
    for key, queries in per_row.items():
        stage, component, mode = key.split("-", 2)
        kept = kept_at_rank_0(queries)
        cells = [share(flags).scaled(100).format(1, "%") for flags in
                 (kept["first step"], *kept["steps"], kept["every step"])]
        rows.append((mode, component, names[int(stage)] if int(stage) < len(names) else stage, *cells))
    return ("\nMulti-token docids: % of correct queries whose docid token keeps rank 1 (0-based rank 0) under the "
            "patch, at the first decoding step (the atomic-like view), at each step t (over the queries whose docid "
            f"has a step t) and at every step (greedy decoding still gives the whole docid). {INTERVALS}\n\n"
            + md_table(["mode", "component", "stage", "first step", *(f"step {t + 1}" for t in range(width)),
                        "every step"], rows) + "\n")


THRESHOLD_OF = {"!=0": 0, ">5": 5, ">10": 10, ">100": 100}  # the CSV's columns: rank above this


def render(layout) -> Section:
    import json

    from genir_jax.analysis.evidence import share
    from genir_jax.analysis.stage_patching import RANKS_JSON

    directory = layout.analysis("patch-stages")
    with open(directory / "patching_results_single_combis.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    ranks = json.loads((directory / RANKS_JSON).read_text())

    def cell(r: dict, column: str) -> str:
        """% of the row's correct queries beyond the column's rank, with its interval and n."""
        values = ranks[f"{r['stage']}-{r['component']}-{r['mode']}"]
        return share([rank > THRESHOLD_OF[column] for rank in values]).scaled(100).format(2)

    stages = stages_of(layout)
    names = stage_names(len(stages))
    table, encoder = [], None
    for mode in ("zero", "mean", "t5"):
        for component in ("mlp", "cross_attn", "attn"):
            cells = {int(r["stage"]): cell(r, "!=0") for r in rows if r["mode"] == mode and r["component"] == component}
            if not cells:
                continue
            paper = PAPER.get((mode, component))
            table.append((mode, component, *(cells[i] + (f" ({paper[i]:.2f})" if paper and i < 3 else
                                                         " (no paper value)")
                                             for i in range(len(stages)))))
        for r in rows:
            if r["mode"] == mode and r["component"].startswith("encoder"):
                encoder = (r["component"], cell(r, "!=0"), cell(r, ">100"))
    text = _docid_note(layout)
    text += md_table(["mode", "component", *(f"stage {n}: % not at rank 1, ours [95% CI] (paper)" for n in names)],
                     table)
    text += (f"\n\nOurs, the paper's NQ10k value in parentheses (attn = self-attention). Stages: "
             f"{describe_stages(stages, named=True)}. {RANKS_NOTE} {INTERVALS}\n")
    from genir_jax.checkpoints.hf import checkpoint_is_decoder_only

    if checkpoint_is_decoder_only(layout.full):
        text += (f"\n{DECODER_ONLY_NOTE}\n")
    if encoder:
        text += (f"\nT5 mode, encoder output (`{encoder[0]}`) replaced by the base T5's: {encoder[1]}% not at "
                 f"rank 1, {encoder[2]}% not in top 101 (rank > 100).\n")
    beyond = [(r["mode"], r["component"], names[int(r["stage"])] if int(r["stage"]) < len(names) else r["stage"],
               *(cell(r, key) for key, _ in DEEPER)) for r in rows
              if not r["component"].startswith("encoder")]
    text += _step_shares(layout, names)
    text += "\nDeeper drops (% of correct queries [95% CI] (n); no paper values):\n\n"
    text += md_table(["mode", "component", "stage", *(label for _, label in DEEPER)], beyond)
    return Section(text)


INTERVALS = "Intervals: 95% bootstrap over the correct queries, n queries."
DECODER_ONLY_NOTE = ("Decoder-only model: zero and mean mode over its attn and mlp (no cross-attention, and no T5 "
                     "mode: it patches a T5 decoder's outputs). Its self-attention is the only way the docid "
                     "position reads the query, unlike the T5 decoder self-attention of the paper's attn rows: "
                     "compare those rows as tendencies of different components.")


EXPERIMENT = Experiment(
    id="table3", title="Stage patching", paper_ref="Sec. 5.1, Table 3", position=40,
    command="genir-jax patch-stages --modes " + ",".join(Config().modes), paper=PAPER, render=render,
    config=Config(), runs={"patch-stages": run_patch_stages}, docids=("atomic", "naive", "semantic"),
    families=BOTH_FAMILIES,
    family_commands={DECODER: "genir-jax patch-stages --modes " + ",".join(decoder_only_modes(Config()))},
)
