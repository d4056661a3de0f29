"""Table 6: top word tokens written by single cross-attention heads for one query."""

from genir_jax.report import Experiment, Section, md_table, read_json

PAPER = {"query": "who wrote the harry potter books", "layer": 16, "head": 1,
         "tokens": ["books", "ouvrage", "books", "authors", "book"]}


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
    steps=("head-tokens",), command="genir-jax crattn-head-tokens", paper=PAPER, render=render,
)
