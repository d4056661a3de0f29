"""Table 6: top tokens written by single stage-II cross-attention heads for one query (docids included, and
words only)."""

import dataclasses
import json

import numpy as np

from genir_jax.analysis.stages import describe_stages, stage_names
from genir_jax.paper.panels import EXPERIMENT_JSON, Experiment, Section, md_table, read_json, record_settings

from genir_jax.paper.experiments._common import correct_inputs, resolve_stages

PAPER = {"query": "who wrote the harry potter books", "layer": 16, "head": 1,
         "tokens": ["books", "ouvrage", "books", "authors", "book"]}


@dataclasses.dataclass(frozen=True)
class Config:
    layers_of_middle_stage: int = 3  # layers spread over stage II (the paper's examples: 12, 14, 16 of 7-17)
    heads_per_layer: int = 4
    top: int = 5                     # tokens per head
    stages: str | None = None        # None: the paper's for 24 decoder layers, else auto (as Table 5)
    batch_size: int = 16


def middle_stage(stages: list[list[int]]) -> list[int]:
    """Stage II of the stages used (the paper's Table 6 heads are stage-II heads)."""
    return list(stages[1] if len(stages) > 1 else stages[0])


def spread_layers(stage: list[int], count: int) -> list[int]:
    """`count` layers spread over the interior of a stage (7-17, 3 -> 9, 12, 15), all of it when shorter."""
    if count >= len(stage):
        return list(stage)
    positions = np.linspace(0, len(stage) - 1, count + 2)[1:-1]
    return sorted({stage[int(round(p))] for p in positions})


def run_head_tokens(layout, settings, config: Config) -> dict:
    """Top tokens of stage-II cross-attention heads for the first correct query, over the whole vocabulary
    (docids included) and over the words only (`genir_jax.analysis.cross_attention_writes.head_top_tokens`;
    the paper's example query is an NQ question, ours comes from the dataset)."""
    from genir_jax.analysis.cross_attention_writes import head_top_tokens, write_head_tokens
    from genir_jax.analysis.stages import write_stages
    from genir_jax.base.io import atomic_directory

    queries = {str(q["id"]): q["query"] for q in json.loads(layout.queries("val").read_text())}
    stages, stages_record, inputs = resolve_stages(config.stages, correct_inputs(layout), settings.progress)
    model = inputs.model
    stage = middle_stage(stages)
    heads = [(layer, head) for layer in spread_layers(stage, config.layers_of_middle_stage)
             for head in range(min(model.config.num_heads, config.heads_per_layer))]
    query = queries[str(inputs.queries[0].query_id)].strip()  # the first correct (held-out) query
    entries = head_top_tokens(model.config, model.params, model.tokenizer, [query], heads, top=config.top,
                              batch_size=config.batch_size, with_docids=True, progress=settings.progress)
    output = layout.analysis("head-tokens")
    with atomic_directory(output) as staging:
        write_head_tokens(staging, entries)
        write_stages(staging, stages_record)
    return record_settings(output, "table6", config, checkpoint=layout.full, query=query,
                           heads=[f"{layer}.{head}" for layer, head in heads], stages=stages,
                           stages_method=stages_record["method"], head_stage=stage)


def _words(values) -> str:
    return ", ".join(str(w).strip() for w in values)


def render(layout) -> Section:
    directory = layout.analysis("head-tokens")
    entries = read_json(directory / "crattn_head_tokens.json")
    record = read_json(directory / EXPERIMENT_JSON) if (directory / EXPERIMENT_JSON).is_file() else {}
    stages = record.get("stages")
    stage_of = {layer: name for name, stage in zip(stage_names(len(stages)), stages) for layer in stage} if stages else {}
    query = entries[0]["query"] if entries else ""
    rows = []
    for e in entries:
        if "top_words" in e:
            top = ", ".join(f"{w} (docid)" if is_docid else w for w, is_docid in zip(e["top_words"], e["top_is_docid"]))
        else:
            top = "not recorded (an older run kept word tokens only)"
        rows.append((f"{e['layer']}.{e['head']}", stage_of.get(e["layer"], "?"), top,
                     _words(e.get("words", e.get("tokens", [])))))
    text = f"Query: *{query}*\n\n" + md_table(
        ["layer.head", "stage", f"top {len(entries[0]['token_ids']) if entries else ''} tokens (docids included)",
         "top word tokens (docids left out)"], rows)
    where = ""
    if "head_stage" in record:
        where = (f"Heads of stage II (layers {record['head_stage'][0]}-{record['head_stage'][-1]} of the stages used: "
                 f"{describe_stages(stages, named=True)}), as the paper's examples (stage II, layers 12, 14, 16 "
                 "of 24). ")
    text += (f"\n\n{where}The first list is the logit lens of the head's output as it is; the second leaves the "
             f"docid tokens out, as the paper's Table 6 lists words. Paper (NQ10k, \"{PAPER['query']}\", layer "
             f"{PAPER['layer']} head {PAPER['head']}, stage II): {', '.join(PAPER['tokens'])}.\n")
    return Section(text)


EXPERIMENT = Experiment(
    id="table6", title="What cross-attention writes: head tokens", paper_ref="Sec. 5.4, Table 6",
    position=90, command="genir-jax crattn-head-tokens", paper=PAPER, render=render, config=Config(),
    runs={"head-tokens": run_head_tokens}, not_applicable=("crattn-head-tokens",),
)
