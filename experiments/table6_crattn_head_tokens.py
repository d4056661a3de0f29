"""Table 6: top word tokens written by single cross-attention heads for one query."""

import dataclasses
import json

from genir_jax.report import Experiment, Section, md_table, read_json, record_settings

from experiments._common import load_model

PAPER = {"query": "who wrote the harry potter books", "layer": 16, "head": 1,
         "tokens": ["books", "ouvrage", "books", "authors", "book"]}


@dataclasses.dataclass(frozen=True)
class Config:
    layers_of_last_stage: int = 2  # the first layers of the last equal-thirds stage
    heads_per_layer: int = 4
    top: int = 5                   # tokens per head
    batch_size: int = 16


def run_head_tokens(layout, settings, config: Config) -> dict:
    """Top word tokens of the last stage's cross-attention heads for the first correct query
    (`genir_jax.analysis.cross_attention_writes.head_top_tokens`; the paper's example query is an NQ question,
    ours comes from the dataset)."""
    from genir_jax.analysis.cross_attention_writes import head_top_tokens, write_head_tokens
    from genir_jax.analysis.stage_patching import default_stages
    from genir_jax.io import atomic_directory

    correct = json.loads(layout.correct_valid.read_text())
    queries = {str(q["id"]): q["query"] for q in json.loads(layout.queries("val").read_text())}
    model = load_model(layout.full)
    layers = model.config.num_decoder_layers
    last_stage = default_stages(layers)[-1] if layers >= 3 else list(range(layers))
    heads = [(layer, head) for layer in last_stage[:config.layers_of_last_stage]
             for head in range(min(model.config.num_heads, config.heads_per_layer))]
    query = queries[str(correct[0][1])].strip()
    entries = head_top_tokens(model.config, model.params, model.tokenizer, [query], heads, top=config.top,
                              batch_size=config.batch_size, progress=settings.progress)
    output = layout.analysis("head-tokens")
    with atomic_directory(output) as staging:
        write_head_tokens(staging, entries)
    return record_settings(output, "table6", config, checkpoint=layout.full, query=query,
                           heads=[f"{layer}.{head}" for layer, head in heads], last_stage=last_stage)


def render(layout) -> Section:
    entries = read_json(layout.analysis("head-tokens") / "crattn_head_tokens.json")
    query = entries[0]["query"] if entries else ""
    rows = [(f"{e['layer']}.{e['head']}", ", ".join(str(w).strip() for w in e.get("words", e.get("tokens", []))))
            for e in entries]
    text = f"Query: *{query}*\n\n" + md_table(["layer.head", "top tokens"], rows)
    text += (f"\n\nPaper (NQ10k, \"{PAPER['query']}\", layer {PAPER['layer']} head {PAPER['head']}): "
             f"{', '.join(PAPER['tokens'])}.\n")
    return Section(text)


EXPERIMENT = Experiment(
    id="table6", title="What cross-attention writes: head tokens", paper_ref="Sec. 5.4, Table 6",
    position=90, command="genir-jax crattn-head-tokens", paper=PAPER, render=render, config=Config(),
    runs={"head-tokens": run_head_tokens},
)
