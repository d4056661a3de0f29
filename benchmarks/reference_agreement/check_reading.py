"""Who reads from whom (Fig. 5) and what cross-attention writes (Tables 5, 6): genir-jax vs the reference.

Builds a random 24-layer T5 (tiny width, real T5 tokenizer, docid tokens with scaled-up embedding rows so
docids reach the top of logit-lens rankings), writes validation queries and a correct_valid.json, and runs
on the same files:

- reference (TransformerLens 2.x, `REFERENCE_PYTHON`, cwd `REFERENCE_CODE`, scripts unmodified):
  `eval_neuron_reading.py` and `eval_cr_attn_reading.py` (dot and cosine), `get_topk_neuron_readings.py`
  (all and top 3), `cross-attention-outputs.py`; and the aggregation cells of
  `visualizations/plots_neuron_crattn_reading.ipynb` (head proportions, stage buckets) as a script with
  three minimal patches, printed when applied. The scripts load `google-t5/t5-large`'s tokenizer from the
  hub only to count its 32100 tokens; a local hub cache holding the real T5 tokenizer under that name
  serves it offline.
- genir-jax: `neuron-reading`, `crattn-reading`, `crattn-writes` and `crattn-head-tokens`, all with
  `--reference` (all layers read; the per-entry files numbered as the reference numbers them; crattn-writes'
  split ``layer < 17`` is stage II).

Compared: the per-entry files' names, every per-entry record (keys and their order, layers, neuron / head indices, argmax encoder
positions, query ids exactly; readings and activations within 1e-4 absolute, or relative where
|value| > 1), the proportion files, the notebook's stage buckets, the per-query docid fractions and
their averages. Table 6 has no reference script: its head tokens are compared with a TransformerLens
computation done here the way `cross-attention-outputs.py` projects (final norm, rescale, unembed).

    REFERENCE_PYTHON=/work/ref-venv/bin/python python benchmarks/reference_agreement/check_reading.py \
        [--queries 55] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

from common import REFERENCE_CODE, REFERENCE_PYTHON, TOKENIZER, cleanup, report, run_ours, workspace

TOLERANCE = 1e-4
D_MODEL, HEADS, LAYERS = 16, 2, 24
DOC_COUNT = 60
HEAD_QUERIES = ["who wrote the harry potter books", "when did the second world war end"]
HEAD_SPECS = "16.1,7.0,23.1"
SUBJECTS = ["the eiffel tower", "the amazon river", "mount everest", "the mona lisa", "the great wall of china",
            "the roman empire", "the first computer", "the olympic games", "the moon landing", "the printing press",
            "the pacific ocean", "the statue of liberty"]
TEMPLATES = ["where is {}", "who built {}", "how old is {}", "what is {}", "when was {} created"]


def build_checkpoint(root: pathlib.Path) -> pathlib.Path:
    """Random 24+24-layer T5 with the real tokenizer and DOC_COUNT docid tokens (rows scaled up x3)."""
    from transformers import AutoTokenizer

    import genir_jax as gj
    from tests.hf_fixtures import HFCheckpointFactory

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    directory, _ = HFCheckpointFactory(root)("base", seed=7, tokenizer=tokenizer, vocab_size=32128, d_model=D_MODEL,
                                             d_kv=4, d_ff=2 * D_MODEL, num_layers=LAYERS, num_decoder_layers=LAYERS,
                                             num_heads=HEADS)
    doc_ids = [f"d{i}" for i in range(DOC_COUNT)]
    model = gj.add_docid_tokens(gj.load_pretrained(directory), doc_ids, mean_resizing=False, seed=7)
    shared = np.array(model.params["shared"])
    shared[len(tokenizer):] *= 3.0
    gj.save_pretrained(root / "dsi", model.replace(params={**model.params, "shared": shared}))
    return root / "dsi"


def write_queries(root: pathlib.Path, count: int) -> tuple[pathlib.Path, pathlib.Path]:
    texts = [t.format(s) for t in TEMPLATES for s in SUBJECTS][:count]
    if len(texts) < count:
        raise SystemExit(f"--queries: at most {len(TEMPLATES) * len(SUBJECTS)}")
    val = [{"id": 500 + i, "query": q, "relevant_docs": [f"d{i % DOC_COUNT}"]} for i, q in enumerate(texts)]
    (root / "val.json").write_text(json.dumps(val))
    order = list(range(1, count)) + [0]  # correct_valid.json need not follow the query file
    (root / "correct_valid.json").write_text(json.dumps([[f"@DOC_ID_d{i % DOC_COUNT}@", 500 + i] for i in order]))
    return root / "val.json", root / "correct_valid.json"


def hub_cache(root: pathlib.Path) -> pathlib.Path:
    """An offline hub cache in which `google-t5/t5-large` resolves to the real T5 tokenizer files."""
    home = root / "hf_home"
    revision = "0" * 40
    snapshot = home / "hub" / "models--google-t5--t5-large" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in TOKENIZER.iterdir():
        if path.is_file() and path.name != "SOURCE.md":
            shutil.copy(path, snapshot / path.name)
    (home / "hub" / "models--google-t5--t5-large" / "refs").mkdir()
    (home / "hub" / "models--google-t5--t5-large" / "refs" / "main").write_text(revision)
    return home


def run_reference(args: list[str], log: pathlib.Path, script: pathlib.Path | None = None) -> float:
    """Run a reference script (path relative to REFERENCE_CODE, or a generated one) offline; seconds."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REFERENCE_CODE))
    start = time.perf_counter()
    command = [REFERENCE_PYTHON, str(script)] + args if script else [REFERENCE_PYTHON] + args
    result = subprocess.run(command, cwd=REFERENCE_CODE, env=env, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"reference {' '.join(command[1:3])} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


# The notebook's aggregation cells, in order, with the minimal patches its code needs to run here.
NOTEBOOK = REFERENCE_CODE / "analysis" / "visualizations" / "plots_neuron_crattn_reading.ipynb"
NOTEBOOK_CELLS = (0, 1, 3, 4, 5, 6, 7, 10, 11)


def notebook_script(work: pathlib.Path, crattn_dir: pathlib.Path, neuron_ratio: pathlib.Path,
                    out: pathlib.Path) -> pathlib.Path:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    patches = {
        1: [('json.load(open(f"{path}/{f}"))', 'json.load(open(f"{data_path}/{f}"))')],  # NameError: `path`
        6: [("for head in range(16):", f"for head in range({HEADS}):")],                   # T5-large's 16 heads
        10: [("json.load(open('../dsi-results/'+ checkpoint + '/neuron_ratio_of_top_k_layers-dot-all.json'))",
              f"json.load(open({str(neuron_ratio)!r}))")],                                  # the author's path
    }
    parts = [f"data_path = {str(crattn_dir)!r}"]
    for index in NOTEBOOK_CELLS:
        text = "".join(cells[index]["source"])
        for old, new in patches.get(index, []):
            if old not in text:
                raise SystemExit(f"cannot patch notebook cell {index}: {old!r} not found")
            text = text.replace(old, new)
            print(f"  patched notebook cell {index}: {old!r} -> {new!r}")
        parts.append(text)
    parts.append(
        f"json.dump({{'crattn_ratio': {{str(k): v for k, v in ratio_of_top_k_layers.items()}},\n"
        f"           'crattn_buckets': {{str(k): dict(v) for k, v in stage_buckets.items()}},\n"
        f"           'mlp_buckets': {{str(k): dict(v) for k, v in stage_buckets_mlp.items()}}}},\n"
        f"          open({str(out)!r}, 'w'))")
    script = work / "notebook_aggregation.py"
    script.write_text("\n\n".join(parts) + "\n")
    return script


TL_HEAD_TOKENS = """
import json, sys, torch
from transformers import AutoTokenizer, AutoModelForSeq2SeqLM
from transformer_lens import HookedEncoderDecoder
from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES
torch.set_grad_enabled(False)
checkpoint, out, heads, first_docid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
queries = sys.argv[5:]
OFFICIAL_MODEL_NAMES.append(checkpoint)
model = HookedEncoderDecoder.from_pretrained(checkpoint, hf_model=AutoModelForSeq2SeqLM.from_pretrained(checkpoint),
                                             device="cpu")
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
results = []
for query in queries:
    _, cache = model.run_with_cache(tokenizer(query, return_tensors="pt")["input_ids"], torch.tensor([[0]]),
                                    remove_batch_dim=True)
    for spec in heads.split(","):
        layer, head = (int(x) for x in spec.split("."))
        vector = cache[f"decoder.{layer}.cross_attn.hook_z"][0, head] @ model.decoder[layer].cross_attn.W_O[head]
        resid = model.decoder_final_ln(vector)
        if model.cfg.tie_word_embeddings:
            resid = resid * model.cfg.d_model ** -0.5
        logits = model.unembed(resid[None, None])[0, 0]
        logits[first_docid:] = -float("inf")
        top = torch.topk(logits, 5)
        results.append({"query": query, "layer": layer, "head": head, "token_ids": top.indices.tolist(),
                        "logits": top.values.tolist()})
json.dump(results, open(out, "w"))
"""


# --------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------

class FloatDiff:
    """Largest absolute and relative differences over compared floats; failures beyond the tolerance."""

    def __init__(self):
        self.count, self.max_abs, self.max_rel, self.bad = 0, 0.0, 0.0, []

    def add(self, ref: float, ours: float, where) -> None:
        diff = abs(ref - ours)
        self.count += 1
        self.max_abs = max(self.max_abs, diff)
        self.max_rel = max(self.max_rel, diff / max(abs(ref), 1e-30) if diff else 0.0)
        if not diff <= TOLERANCE * max(1.0, abs(ref)):
            self.bad.append((where, ref, ours))

    def detail(self) -> str:
        text = f"{self.count} floats, max |diff| {self.max_abs:.1e}, max rel {self.max_rel:.1e}"
        return text + (f"; {len(self.bad)} beyond 1e-4, e.g. {self.bad[:2]}" if self.bad else "")


def reference_entries(directory: pathlib.Path, prefix: str) -> tuple[list, list[str]]:
    """The reference's per-entry files in dump order (the number in a name is the query index at the dump)."""
    files = sorted((p for p in directory.iterdir() if p.name.startswith(prefix)),
                   key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return [e for p in files for e in json.loads(p.read_text())], [p.name for p in files]


def compare_entries(ref: list, ours: list, exact: tuple[str, ...], floats: tuple[str, ...]) -> tuple[bool, str]:
    if len(ref) != len(ours):
        return False, f"{len(ref)} reference entries vs {len(ours)} ours"
    diff, mismatches = FloatDiff(), []
    for n, (r, o) in enumerate(zip(ref, ours)):
        if list(r) != list(o) or any(r[k] != o[k] for k in exact) or list(r["value"]) != list(o["value"]):
            mismatches.append(n)
            continue
        for key in floats:
            diff.add(r[key], o[key], (n, key))
        for name, value in r["value"].items():
            diff.add(value, o["value"][name], (n, name))
    detail = f"{len(ref)} entries ({', '.join(exact)} and key order exact): {diff.detail()}"
    if mismatches:
        detail += f"; {len(mismatches)} entries differ in keys/order/{'/'.join(exact)}, first #{mismatches[0]}"
    return not mismatches and not diff.bad and len(ref) > 0, detail


def compare_proportions(ref: dict, ours: dict) -> tuple[bool, str]:
    """{layer: [[component, proportion], ...]} files: same layers, same components, values within 1e-4."""
    ref = {str(k): dict(map(tuple, v)) for k, v in ref.items()}
    ours = {str(k): dict(map(tuple, v)) for k, v in ours.items()}
    if set(ref) != set(ours):
        return False, f"layers differ: {sorted(ref)} vs {sorted(ours)}"
    diff, differing = FloatDiff(), [layer for layer in ref if set(ref[layer]) != set(ours[layer])]
    for layer in ref:
        for name, value in ref[layer].items():
            if name in ours[layer]:
                diff.add(value, ours[layer][name], (layer, name))
    detail = f"{len(ref)} layers, components {'same' if not differing else f'DIFFER in {differing}'}: {diff.detail()}"
    return not differing and not diff.bad, detail


def compare_buckets(ref: dict, summary_layers: dict) -> tuple[bool, str]:
    """The notebook's stage buckets vs our summary's per-layer buckets."""
    from genir_jax.core.sites import component_site, site_name

    diff, missing = FloatDiff(), sorted(set(ref) - set(summary_layers))
    for layer, buckets in ref.items():
        if layer not in summary_layers:
            continue
        ours = summary_layers[layer]
        expected = {"embedding": buckets.get(site_name("decoder", "hook_resid_pre", 0), 0.0)}
        for kind in ("attn", "cross_attn", "mlp"):
            for stage in range(len(ours[kind])):
                expected[(kind, stage)] = buckets.get(component_site("decoder", kind, stage), 0.0)
        diff.add(expected.pop("embedding"), ours["embedding"], (layer, "embedding"))
        for (kind, stage), value in expected.items():
            diff.add(value, ours[kind][stage], (layer, kind, stage))
    extra = sorted(set(summary_layers) - set(ref))
    detail = f"{len(ref)} layers x 10 buckets: {diff.detail()}"
    if missing or extra:
        detail += f"; layers only in reference {missing}, only ours {extra}"
    return not diff.bad and not missing and not extra, detail


def compare_lists(ref: dict, ours: dict) -> tuple[bool, str]:
    if list(ref) != list(ours) or any(len(ref[k]) != len(ours[k]) for k in ref):
        return False, f"keys/lengths differ: {[(k, len(v)) for k, v in ref.items()]} vs {[(k, len(v)) for k, v in ours.items()]}"
    diff = FloatDiff()
    for key in ref:
        for n, (a, b) in enumerate(zip(ref[key], ours[key])):
            diff.add(a, b, (key, n))
    nonzero = sum(v > 0 for values in ref.values() for v in values)
    return not diff.bad, f"keys {list(ref)}, {diff.detail()} ({nonzero} non-zero fractions)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=55,
                        help="correct queries (default 55: more than the reference's 50-query chunks)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--sims", default="dot,cosine", help="similarities to check (default: dot,cosine)")
    args = parser.parse_args()
    root = workspace()
    rows: list[tuple[str, bool, str]] = []
    try:
        checkpoint = build_checkpoint(root)
        val, correct = write_queries(root, args.queries)
        os.environ["HF_HOME"] = str(hub_cache(root))
        ref, ours, logs = root / "ref", root / "ours", root / "logs"
        for d in (ref, ours, logs):
            d.mkdir()
        common = ["-c", str(checkpoint), "--val-queries", str(val), "--correct-valid", str(correct)]
        ours_common = ["--checkpoint", str(checkpoint), "--val-queries", str(val), "--correct-valid", str(correct),
                       "--reference", "--no-progress", "--allow-incorrect"]  # the reference checks no pair
        timings = {}

        for sim in args.sims.split(","):
            # --- MLP neurons ------------------------------------------------------------------------
            (ref / f"neuron_{sim}").mkdir()  # the reference script does not create its output directory
            timings[f"ref neuron {sim}"] = run_reference(
                common + ["--sim-type", sim, "-o", str(ref / f"neuron_{sim}")], logs / f"neuron_{sim}.log",
                REFERENCE_CODE / "analysis" / "eval_neuron_reading.py")
            for k in (None, "3"):
                run_reference(["-p", str(ref / f"neuron_{sim}"), "--sim-type", sim] + (["--topk", k] if k else []),
                              logs / f"topk_{sim}_{k}.log", REFERENCE_CODE / "analysis" / "get_topk_neuron_readings.py")
            start = time.perf_counter()
            run_ours(["neuron-reading", *ours_common, "--sim-type", sim, "--topk", "all", "3",
                      "-o", str(ours / f"neuron_{sim}")])
            timings[f"ours neuron {sim}"] = time.perf_counter() - start
            ref_entries, ref_files = reference_entries(ref / f"neuron_{sim}", "all_queries_neuron_similarities_")
            from genir_jax.analysis.reading import iter_raw_entries

            our_entries = list(iter_raw_entries(ours / f"neuron_{sim}", "mlp", sim))
            rows.append((f"neuron entries ({sim})",
                         *compare_entries(ref_entries, our_entries, ("sim_type", "layer", "q_id", "position"),
                                          ("actviation",))))
            our_files = sorted((p.name for p in (ours / f"neuron_{sim}").glob("all_queries_*")),
                               key=lambda n: int(n[:-5].rsplit("_", 1)[1]))
            rows.append((f"neuron per-entry file names ({sim})", our_files == ref_files, f"{ref_files} / {our_files}"))
            for k in ("all", "3"):
                name = f"neuron_ratio_of_top_k_layers-{sim}-{k}.json"
                rows.append((name, *compare_proportions(json.loads((ref / f"neuron_{sim}" / name).read_text()),
                                                        json.loads((ours / f"neuron_{sim}" / name).read_text()))))

            # --- cross-attention heads --------------------------------------------------------------
            timings[f"ref crattn {sim}"] = run_reference(
                common + ["--sim-type", sim, "-o", str(ref / f"crattn_{sim}")], logs / f"crattn_{sim}.log",
                REFERENCE_CODE / "analysis" / "eval_cr_attn_reading.py")
            start = time.perf_counter()
            run_ours(["crattn-reading", *ours_common, "--sim-type", sim, "-o", str(ours / f"crattn_{sim}")])
            timings[f"ours crattn {sim}"] = time.perf_counter() - start
            ref_entries, ref_files = reference_entries(ref / f"crattn_{sim}", "all_queries_crattn_similarities_")
            our_files = sorted((p.name for p in (ours / f"crattn_{sim}").glob("all_queries_*")),
                               key=lambda n: int(n[:-5].rsplit("_", 1)[1]))
            rows.append((f"crattn per-entry file names ({sim})", our_files == ref_files, f"{ref_files} / {our_files}"))
            our_entries = list(iter_raw_entries(ours / f"crattn_{sim}", "cross_attn", sim))
            rows.append((f"cross-attention head entries ({sim})",
                         *compare_entries(ref_entries, our_entries,
                                          ("sim_type", "layer", "head", "q_id", "enc_position"), ())))

        # --- the notebook's aggregation (dot, as in the paper's figure) -----------------------------
        aggregated = root / "notebook.json"
        script = notebook_script(root, ref / "crattn_dot", ref / "neuron_dot" / "neuron_ratio_of_top_k_layers-dot-all.json",
                                 aggregated)
        run_reference([], logs / "notebook.log", script)
        notebook = json.loads(aggregated.read_text())
        rows.append(("crattn proportions (notebook) vs crattn_ratio_of_top_k_layers-dot-all.json",
                     *compare_proportions(notebook["crattn_ratio"],
                                          json.loads((ours / "crattn_dot" / "crattn_ratio_of_top_k_layers-dot-all.json")
                                                     .read_text()))))
        # the stage buckets are our summaries, which reference mode does not write: the padding part alone
        padding_only = [a if a != "--reference" else "--reference-padding" for a in ours_common]
        run_ours(["crattn-reading", *padding_only, "--summary-only", "-o", str(ours / "crattn_dot_summary")])
        run_ours(["neuron-reading", *padding_only, "--layers", "all", "--summary-only", "-o",
                  str(ours / "neuron_dot_summary")])
        crattn_summary = json.loads((ours / "crattn_dot_summary" / "crattn_reading_summary.json").read_text())
        rows.append(("crattn stage buckets (notebook) vs crattn_reading_summary.json",
                     *compare_buckets(notebook["crattn_buckets"], crattn_summary["results"]["all"]["per_layer"])))
        neuron_summary = json.loads((ours / "neuron_dot_summary" / "neuron_reading_summary.json").read_text())
        rows.append(("MLP stage buckets (notebook) vs neuron_reading_summary.json",
                     *compare_buckets(notebook["mlp_buckets"], neuron_summary["results"]["all"]["per_layer"])))

        # --- Table 5 -------------------------------------------------------------------------------
        timings["ref crattn writes"] = run_reference(common + ["-o", str(ref / "writes")], logs / "writes.log",
                                                     REFERENCE_CODE / "analysis" / "cross-attention-outputs.py")
        start = time.perf_counter()
        run_ours(["crattn-writes", *ours_common, "-o", str(ours / "writes")])
        timings["ours crattn writes"] = time.perf_counter() - start
        for name in ("per_q_averages_sII.json", "per_q_averages_sIII.json"):
            rows.append((name, *compare_lists(json.loads((ref / "writes" / name).read_text()),
                                              json.loads((ours / "writes" / name).read_text()))))
        ref_ratios = json.loads((ref / "writes" / "cr_attn_ratios.json").read_text())
        our_ratios = json.loads((ours / "writes" / "cr_attn_ratios.json").read_text())
        diff = FloatDiff()
        for key, value in ref_ratios.items():
            diff.add(value, our_ratios.get(key, float("nan")), key)
        rows.append(("cr_attn_ratios.json", list(ref_ratios) == list(our_ratios) and not diff.bad,
                     f"keys {list(ref_ratios)}: {diff.detail()}"))

        # --- Table 6 (no reference script: a TransformerLens computation) ---------------------------
        tl_script = root / "tl_head_tokens.py"
        tl_script.write_text(TL_HEAD_TOKENS)
        from transformers import AutoTokenizer

        first_docid = len(AutoTokenizer.from_pretrained(str(TOKENIZER)))
        run_reference([str(checkpoint), str(root / "tl_heads.json"), HEAD_SPECS, str(first_docid), *HEAD_QUERIES],
                      logs / "tl_heads.log", tl_script)
        run_ours(["crattn-head-tokens", "--checkpoint", str(checkpoint), "--queries", *HEAD_QUERIES, "--heads",
                  HEAD_SPECS, "--reference-padding", "--no-progress", "-o", str(ours / "heads")])
        tl_heads = json.loads((root / "tl_heads.json").read_text())
        our_heads = json.loads((ours / "heads" / "crattn_head_tokens.json").read_text())
        same = [(t["query"], t["layer"], t["head"], t["token_ids"]) == (o["query"], o["layer"], o["head"], o["token_ids"])
                for t, o in zip(tl_heads, our_heads)]
        diff = FloatDiff()
        for t, o in zip(tl_heads, our_heads):
            for a, b in zip(t["logits"], o["logits"]):
                diff.add(a, b, (t["layer"], t["head"]))
        rows.append(("head top-5 word tokens vs TransformerLens (no reference script)",
                     all(same) and len(tl_heads) == len(our_heads) and not diff.bad,
                     f"{sum(same)}/{len(tl_heads)} (query, head) top-5 id lists identical; logits: {diff.detail()}; "
                     f"e.g. {our_heads[0]['layer']}.{our_heads[0]['head']}: {our_heads[0]['words']}"))
        print("timings (s, including model loading and compilation): "
              + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    finally:
        if args.keep:
            print(f"work directory kept: {root}")
        else:
            cleanup(root)
    return report(rows)


if __name__ == "__main__":
    sys.exit(main())
