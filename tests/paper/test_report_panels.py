"""The reproduction report's panels compare like with like (issue 12, item 4): each render is fed a small
synthetic OUT layout whose per-query values we choose, and the numbers it prints must be the paper's statistic
of those values (a plain numpy computation), under labels that name the statistic and the stage."""

import json

import numpy as np
import pytest

from genir_jax.paper import reproduce as rp
from genir_jax.core.config import T5Config

LAYERS = 6  # equal thirds: I = 0-1, II = 2-3, III = 4-5


def _layout(tmp_path, layers: int = LAYERS) -> rp.Layout:
    layout = rp.Layout(tmp_path)
    layout.full.mkdir(parents=True)
    T5Config(vocab_size=64, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_decoder_layers=layers,
             num_heads=2).to_json_file(layout.full / "config.json")
    return layout


def _table(markdown: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The markdown table whose first header cell is `first_header`: (headers, rows of cells)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    headers = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return headers, rows


# --------------------------------------------------------------------------------------------------
# Fig. 4: means over queries (median for the non-docid tokens, per query)
# --------------------------------------------------------------------------------------------------

def test_figure4_prints_the_papers_means_over_queries(tmp_path):
    from genir_jax.analysis.evidence import bootstrap
    from genir_jax.paper.experiments import figure4_rank_development as fig4
    from genir_jax.analysis.residual import LENS_SITES, ResidualRankResult, write_residual_rank

    layout = _layout(tmp_path)
    rng = np.random.default_rng(0)
    queries, vocab, docids = 5, 64, 16
    # Skewed per-query ranks: one outlier query makes mean and median differ clearly.
    lens = rng.integers(0, 5, size=(queries, LAYERS, len(LENS_SITES)))
    lens[0] += 40
    docid_sum = rng.integers(docids * (docids - 1) // 2, docids * 40, size=(queries, LAYERS))
    docid_sum[1] += 300
    non_docid_median = rng.integers(10, 30, size=(queries, LAYERS))
    non_docid_median[2] += 25
    stats = {name: rng.integers(0, vocab, size=(queries, LAYERS)) for name in
             ("docid_min", "docid_max", "non_docid_min", "non_docid_max")}
    stats.update(non_docid_median=non_docid_median, docid_sum=docid_sum)
    result = ResidualRankResult(query_ids=[f"q{i}" for i in range(queries)],
                                contributions=rng.random((queries, LAYERS, 3, 5), dtype=np.float32),
                                lens_ranks=lens, vocab_stats=stats, docid_count=docids, vocab_size=vocab,
                                sum_ranks=rng.integers(0, 200, size=(queries, 2)),
                                final_ranks=np.zeros(queries, np.int64))
    write_residual_rank(layout.analysis("residual-rank"), result)
    section = fig4.render(layout)
    headers, rows = _table(section.markdown, "layer")
    sites = [site for site, _ in LENS_SITES]
    expected = {
        "relevant docid (resid_post), mean": lens[:, :, sites.index("resid_post")].mean(axis=0),
        "relevant docid (cross-attn out), mean": lens[:, :, sites.index("cross_attn_out")].mean(axis=0),
        "relevant docid (MLP out), mean": lens[:, :, sites.index("mlp_out")].mean(axis=0),
        "mean docid rank, mean": (docid_sum / docids).mean(axis=0),
        "median non-docid rank, mean": non_docid_median.mean(axis=0),
    }
    assert len(rows) == LAYERS
    per_query = {
        "relevant docid (resid_post), mean": lens[:, :, sites.index("resid_post")],
        "relevant docid (cross-attn out), mean": lens[:, :, sites.index("cross_attn_out")],
        "relevant docid (MLP out), mean": lens[:, :, sites.index("mlp_out")],
        "mean docid rank, mean": docid_sum / docids, "median non-docid rank, mean": non_docid_median,
    }
    for column, values in expected.items():
        index = headers.index(column)
        assert [float(row[index].split(" [")[0]) for row in rows] == pytest.approx(np.round(values, 1), abs=0.051), \
            column
        assert [row[index] for row in rows] == [bootstrap(per_query[column][:, layer].astype(np.float64)).format(1)
                                                for layer in range(LAYERS)], column
    # Not the other statistic (the median over queries of the relevant rank differs here).
    median = np.median(lens[:, :, sites.index("resid_post")], axis=0)
    assert not np.allclose(median, expected["relevant docid (resid_post), mean"])
    assert [row[1] for row in rows] == ["I", "I", "II", "II", "III", "III"]
    assert "MEAN of these per-query values" in section.markdown and "median rank of the non-docid" in section.markdown
    assert "Ranks count from 0" in section.markdown
    assert section.figures and section.figures[0].read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------------
# Thresholds: 0-based ranks, labels counted from 1 (Table 3, stage robustness)
# --------------------------------------------------------------------------------------------------

THRESHOLDS = (("!=0", 0), (">5", 5), (">10", 10), (">100", 100))


def _stage_patching_csv(layout, ranks: dict) -> None:
    """patching_results_single_combis.csv as the analysis writes it, from per-query ranks per (mode, component,
    stage)."""
    directory = layout.analysis("patch-stages")
    directory.mkdir(parents=True, exist_ok=True)
    lines = [",component,stage,mode," + ",".join(label for label, _ in THRESHOLDS)]
    for index, ((mode, component, stage), values) in enumerate(ranks.items()):
        fractions = [repr(float(np.mean(np.asarray(values) > t))) for _, t in THRESHOLDS]
        lines.append(",".join([str(index), component, str(stage), mode, *fractions]))
    (directory / "patching_results_single_combis.csv").write_text("\n".join(lines) + "\n")
    (directory / "ranks_correct_queries_patching_single_combis.json").write_text(json.dumps(
        {f"{stage}-{component}-{mode}": [int(r) for r in values] for (mode, component, stage), values in ranks.items()}))
    (directory / "stages.json").write_text(json.dumps({"method": "thirds", "stages": [[0, 1], [2, 3], [4, 5]]}))


def test_table3_labels_count_from_1_and_shows_the_self_attention_rows(tmp_path):
    from genir_jax.analysis.evidence import share
    from genir_jax.paper.experiments import table3_stage_patching as table3

    layout = _layout(tmp_path)
    rng = np.random.default_rng(1)
    ranks = {(mode, component, stage): rng.choice([0, 0, 3, 5, 6, 10, 11, 100, 101, 500], size=20)
             for mode in ("zero", "mean") for component in ("mlp", "cross_attn", "attn") for stage in range(3)}
    _stage_patching_csv(layout, ranks)
    text = table3.render(layout).markdown
    headers, rows = _table(text, "mode")
    assert headers[2:] == [f"stage {n}: % not at rank 1, ours [95% CI] (paper)" for n in ("I", "II", "III")]
    by_row = {(row[0], row[1]): row[2:] for row in rows}
    for (mode, component), paper in (((m, c), table3.PAPER.get((m, c))) for m in ("zero", "mean")
                                     for c in ("mlp", "cross_attn", "attn")):
        for stage in range(3):
            ours = 100 * np.mean(ranks[(mode, component, stage)] != 0)
            interval = share(ranks[(mode, component, stage)] != 0).scaled(100)
            expected = interval.format(2) + (f" ({paper[stage]:.2f})" if paper else " (no paper value)")
            assert by_row[(mode, component)][stage] == expected
            assert expected.startswith(f"{ours:.2f} [") and "(n=20)" in expected
    assert by_row[("zero", "attn")][0].endswith("(1.52)")  # the paper's self-attention row
    assert "not in the top 6, 11 and 101" in text and "Ranks count from 0" in text
    headers, rows = _table(text.split("Deeper drops")[1], "mode")
    assert headers[3:] == ["% not in top 6 (rank > 5)", "% not in top 11 (rank > 10)",
                           "% not in top 101 (rank > 100)"]
    stage_index = {"I": 0, "II": 1, "III": 2}
    for row in rows:
        values = np.asarray(ranks[(row[0], row[1], stage_index[row[2]])])
        # counted from 1: "not in top k" is a 1-based rank above k
        expected = [100 * np.mean(values + 1 > k) for k in (6, 11, 101)]
        assert [float(cell.split(" [")[0]) for cell in row[3:]] == pytest.approx(expected, abs=0.006)
        assert row[3:] == [share(values + 1 > k).scaled(100).format(2) for k in (6, 11, 101)]
    assert ">5" not in text.replace("`>5`", "") and "beyond rank" not in text


def test_stage_robustness_labels_count_from_1(tmp_path):
    from genir_jax.analysis.evidence import bootstrap, share
    from genir_jax.paper.experiments import stage_robustness
    from genir_jax.analysis.stage_robustness import StageRobustnessResult, write_stage_robustness

    layout = _layout(tmp_path)
    values = np.asarray([0, 0, 5, 6, 10, 11, 100, 101, 7, 0])
    row = {"kind": "all_layers", "component": "mlp", "mode": "zero",
           **{label: float(np.mean(values > t)) for label, t in THRESHOLDS}, "mean_rank": float(values.mean())}
    result = StageRobustnessResult(rows=[row], ranks=values[None], partitions={"thirds": [[0, 1], [2, 3], [4, 5]]})
    directory = layout.analysis("stage-robustness")
    directory.mkdir(parents=True)
    write_stage_robustness(directory, result, partition_records={"thirds": {"method": "thirds"}}, queries=10)
    text = stage_robustness.EXPERIMENT.render(layout).markdown
    headers, rows = _table(text, "component (every layer)")
    assert headers[2:] == ["not at rank 1 (rank > 0)", "not in top 6 (rank > 5)", "not in top 11 (rank > 10)",
                           "not in top 101 (rank > 100)", "mean rank (0-based)"]
    expected = [np.mean(values + 1 > k) for k in (1, 6, 11, 101)] + [values.mean()]
    assert [float(cell.split(" [")[0]) for cell in rows[0][2:]] == pytest.approx(expected, abs=0.051)
    assert rows[0][2:6] == [share(values + 1 > k).format(2) for k in (1, 6, 11, 101)]
    assert rows[0][6] == bootstrap(values).format(1) and rows[0][6].endswith("(n=10)")
    assert "Ranks count from 0" in text and "beyond the top 5" not in text


# --------------------------------------------------------------------------------------------------
# Table 5: the paper's row is stage II only
# --------------------------------------------------------------------------------------------------

def test_table5_sets_the_paper_beside_stage_ii_only(tmp_path):
    from genir_jax.analysis.evidence import bootstrap
    from genir_jax.paper.experiments import table5_crattn_docid_share as table5
    from genir_jax.analysis.cross_attention_writes import DocidShareResult, write_docid_shares

    layout = _layout(tmp_path)
    stages = [[0, 1], [2, 3], [4, 5]]
    layers = [2, 3, 4, 5]
    cutoffs = (10, 100, 1000)
    rng = np.random.default_rng(2)
    counts = np.stack([rng.integers(0, k // 2, size=(7, len(layers))) for k in cutoffs], axis=-1)
    directory = layout.analysis("crattn-writes")
    directory.mkdir(parents=True)
    write_docid_shares(directory, DocidShareResult(counts, layers, stages, cutoffs))
    text = table5.render(layout).markdown
    headers, rows = _table(text, "")
    assert headers[1:] == [f"% docids in top {k} (mean over queries and layers) [95% CI]" for k in cutoffs]
    labels = [row[0] for row in rows]
    assert labels == ["stage II (layers 2-3), ours", "stage II, paper (NQ10k)", "stage III (layers 4-5), ours",
                      "stage III, paper"]
    for row, columns in ((rows[0], [0, 1]), (rows[2], [2, 3])):
        expected = [100 * np.mean(counts[:, columns, c] / k) for c, k in enumerate(cutoffs)]
        assert [float(cell.split(" [")[0]) for cell in row[1:]] == pytest.approx(expected, abs=0.006)
        assert row[1:] == [bootstrap(np.mean(counts[:, columns, c] / k, axis=1)).scaled(100).format(2)
                           for c, k in enumerate(cutoffs)]
        assert row[1].endswith("(n=7)")
    assert rows[1][1:] == ["0.00", "0.10", "2.30"]
    assert rows[3][1:] == ["no paper value"] * 3


# --------------------------------------------------------------------------------------------------
# Table 6: stage-II heads, docid tokens shown, words beside them
# --------------------------------------------------------------------------------------------------

def test_table6_takes_stage_ii_heads():
    from genir_jax.paper.experiments.table6_crattn_head_tokens import middle_stage, spread_layers

    paper = [list(range(0, 7)), list(range(7, 18)), list(range(18, 24))]
    assert middle_stage(paper) == list(range(7, 18))
    assert spread_layers(middle_stage(paper), 3) == [9, 12, 15]
    assert middle_stage([[0, 1], [2, 3], [4, 5]]) == [2, 3] and spread_layers([2, 3], 3) == [2, 3]


def test_table6_shows_docids_and_words_with_their_stage(tmp_path):
    from genir_jax.paper.experiments import table6_crattn_head_tokens as table6
    from genir_jax.paper.report import record_settings

    layout = _layout(tmp_path)
    directory = layout.analysis("head-tokens")
    directory.mkdir(parents=True)
    entries = [{"query": "who wrote it", "layer": 2, "head": 0, "token_ids": [5, 6], "tokens": ["▁books", "▁book"],
                "words": ["books", "book"], "logits": [3.0, 2.0], "top_token_ids": [40, 5],
                "top_tokens": ["@DOC_ID_7@", "▁books"], "top_words": ["@DOC_ID_7@", "books"],
                "top_logits": [4.0, 3.0], "top_is_docid": [True, False]}]
    (directory / "crattn_head_tokens.json").write_text(json.dumps(entries))
    record_settings(directory, "table6", table6.Config(), stages=[[0, 1], [2, 3], [4, 5]], head_stage=[2, 3],
                    heads=["2.0"])
    text = table6.render(layout).markdown
    headers, rows = _table(text, "layer.head")
    assert headers == ["layer.head", "stage", "top 2 tokens (docids included)", "top word tokens (docids left out)"]
    assert rows == [["2.0", "II", "@DOC_ID_7@ (docid), books", "books, book"]]
    assert "Heads of stage II (layers 2-3" in text


def test_head_top_tokens_with_docids_equal_a_numpy_logit_lens(lens_dsi):
    from tests.analysis.test_analysis_crattn_writes import _docid_ids, _numpy_lens
    import genir_jax as gj
    from genir_jax.analysis import cross_attention_writes as cw

    _, model = lens_dsi
    texts = ["who wrote the harry potter books", "when did the war end"]
    heads = [(3, 1), (1, 0), (2, 1)]
    plain = cw.head_top_tokens(model.config, model.params, model.tokenizer, texts, heads, top=5, progress=False)
    entries = cw.head_top_tokens(model.config, model.params, model.tokenizer, texts, heads, top=5, with_docids=True,
                                 progress=False)
    docids = _docid_ids(model)
    w_o = np.asarray(model.params["decoder"]["layers"]["cross_attn"]["out"], np.float64)
    shown = 0
    for entry, words_only in zip(entries, plain):
        assert {k: entry[k] for k in words_only} == words_only  # the word tokens are unchanged
        ids = np.asarray([model.tokenizer(entry["query"]).input_ids])
        site = f"decoder.{entry['layer']}.cross_attn.hook_z"
        _, cache = gj.forward_with_cache(model.config, model.params, ids, np.ones_like(ids), np.zeros((1, 1), np.int32),
                                         cache_sites=[site])
        z = np.asarray(cache[site], np.float64)[0, 0, entry["head"]]
        logits = _numpy_lens(model, z @ w_o[entry["layer"], entry["head"]])
        order = [int(t) for t in np.argsort(-logits, kind="stable")][:5]
        assert entry["top_token_ids"] == order
        np.testing.assert_allclose(entry["top_logits"], logits[order], rtol=1e-4, atol=1e-5)
        assert entry["top_is_docid"] == [t in docids for t in order]
        assert entry["top_tokens"] == model.tokenizer.convert_ids_to_tokens(order)
        shown += any(entry["top_is_docid"])
    assert shown > 0  # docids lead some heads, and are no longer dropped



# --------------------------------------------------------------------------------------------------
# Table 2: the removed documents' MRR and Hits@1, labelled with their statistic
# --------------------------------------------------------------------------------------------------

def test_table2_prints_the_removed_documents_mrr_and_hits_at_1(tmp_path):
    from genir_jax.analysis.evidence import bootstrap, share
    from genir_jax.paper.experiments import table2_encoder_swap as table2
    from genir_jax.analysis.encoder_swap import summarize
    from genir_jax.analysis.inputs import CorrectQuery
    from genir_jax.paper.report import record_settings

    layout = _layout(tmp_path)
    documents = [f"@DOC_ID_d{i}@" for i in range(8)]
    queries = [CorrectQuery(f"q{i}", f"query {i}", documents[i % 8], 100 + i % 8) for i in range(12)]
    ranks = np.asarray([0, 3, 0, 1, 9, 0, 2, 0, 0, 40, 0, 7])
    removed = ["d1", "d2", "d3"]
    layout.removed_documents.write_text(json.dumps({"removed-0": removed}))
    directory = layout.analysis("swap-encoder")
    directory.mkdir(parents=True)
    results = {str(layout.removed(0)): summarize(ranks, queries, removed).as_reference_dict(),
               "/models/base": summarize(ranks + 5, queries, []).as_reference_dict()}
    (directory / "swapped_encoder.json").write_text(json.dumps(results))
    record_settings(directory, "table2", table2.Config(), queries=len(queries))
    text = table2.render(layout).markdown
    headers, rows = _table(text, "encoder from")
    assert headers == ["encoder from", "removed docs' correct queries",
                       "MRR (removed docs: mean of 1/(rank+1)) [95% CI]", "Hits@1 (removed docs: % at rank 1) [95% CI]",
                       "mean rank (all correct queries, 0-based) [95% CI]",
                       "median rank (all correct queries, 0-based) [95% CI]",
                       "not at rank 1 (all correct queries), of 12"]
    of_removed = np.asarray([r for r, q in zip(ranks, queries) if q.docid_token in {f"@DOC_ID_{d}@" for d in removed}])
    ours = rows[0]
    assert ours[0] == "removed-0, ours" and int(ours[1]) == of_removed.size == 6
    estimate = [float(cell.split(" [")[0]) for cell in ours[2:6]]
    assert estimate[0] == pytest.approx(np.mean(1 / (of_removed + 1)), abs=0.0006)
    assert estimate[1] == pytest.approx(100 * np.mean(of_removed == 0), abs=0.006)
    assert estimate[2] == pytest.approx(ranks.mean(), abs=0.006)
    assert estimate[3] == np.sort(ranks)[(len(ranks) - 1) // 2] and int(ours[6]) == np.sum(ranks != 0)
    assert ours[2] == bootstrap(1 / (of_removed + 1)).format(3) and ours[2].endswith("(n=6)")
    assert ours[3] == share(of_removed == 0).scaled(100).format(2)
    assert ours[4] == bootstrap(ranks).format(2) and ours[4].endswith("(n=12)")
    assert ours[5] == bootstrap(ranks, table2.lower_median).format(1)
    assert rows[1][0] == "base T5 (pretrained only), ours" and rows[1][2] == rows[1][3] == ""
    assert rows[2][0] == "a model without the documents, paper (NQ10k)"
    assert rows[2][2:4] == ["paper value not in PAPER.md"] * 2
    assert rows[3][0] == "pretrained T5, paper (NQ10k)" and rows[3][4] == "21.66"


# --------------------------------------------------------------------------------------------------
# Fig. 3: per-stage ratio and cosine, and which residual the cosine is taken with
# --------------------------------------------------------------------------------------------------

def test_figure3_states_the_cosine_residual_and_prints_stage_means(tmp_path):
    from genir_jax.analysis.evidence import bootstrap
    from genir_jax.paper.experiments import figure3_residual_contributions as fig3
    from genir_jax.analysis.residual import ResidualRankResult, write_residual_rank

    layout = _layout(tmp_path)
    rng = np.random.default_rng(3)
    queries = 4
    contributions = rng.random((queries, LAYERS, 3, 5), dtype=np.float32)
    stats = {name: np.zeros((queries, LAYERS), np.int64) for name in
             ("docid_min", "docid_max", "non_docid_min", "non_docid_max", "non_docid_median")}
    stats["docid_sum"] = np.full((queries, LAYERS), 6, np.int64)
    result = ResidualRankResult(query_ids=[f"q{i}" for i in range(queries)], contributions=contributions,
                                lens_ranks=np.zeros((queries, LAYERS, 5), np.int64), vocab_stats=stats,
                                docid_count=4, vocab_size=64, sum_ranks=np.zeros((queries, 2), np.int64),
                                final_ranks=np.zeros(queries, np.int64))
    write_residual_rank(layout.analysis("residual-rank"), result)
    section = fig3.render(layout)
    headers, rows = _table(section.markdown, "stage")
    assert headers[2:] == [f"{func}: {label}" for func in ("ratio", "cosine")
                           for label in ("self-attention", "cross-attention", "MLP")]
    for row, layers in zip(rows, ([0, 1], [2, 3], [4, 5])):
        expected = [contributions[:, layers, f, p].astype(np.float64).mean() for f in (0, 2) for p in range(3)]
        assert [float(cell.split(" [")[0]) for cell in row[2:]] == pytest.approx(expected, abs=0.006)
        assert row[2:] == [bootstrap(contributions[:, layers, f, p].astype(np.float64).mean(axis=1)).format(2)
                           for f in (0, 2) for p in range(3)]
    assert "computes it with the layer's OUTPUT residual, resid_post" in section.markdown
    assert "We plot and tabulate the reference's: cosine(component, resid_post)" in section.markdown

    # with stages chosen for the tables (patch-stages' stages.json, e.g. automatic ones), Fig. 3 uses the same
    patch_stages = layout.analysis("patch-stages")
    patch_stages.mkdir(parents=True)
    (patch_stages / "stages.json").write_text(json.dumps({"method": "auto", "stages": [[0], [1, 2], [3, 4, 5]]}))
    section = fig3.render(layout)
    _, rows = _table(section.markdown, "stage")
    assert [row[1] for row in rows] == ["0-0", "1-2", "3-5"]
    for row, layers in zip(rows, ([0], [1, 2], [3, 4, 5])):
        expected = [contributions[:, layers, f, p].astype(np.float64).mean() for f in (0, 2) for p in range(3)]
        assert [float(cell.split(" [")[0]) for cell in row[2:]] == pytest.approx(expected, abs=0.006)
        assert row[2:] == [bootstrap(contributions[:, layers, f, p].astype(np.float64).mean(axis=1)).format(2)
                           for f in (0, 2) for p in range(3)]


# --------------------------------------------------------------------------------------------------
# Fig. 5: one (stacked) bar and one table row per reader layer
# --------------------------------------------------------------------------------------------------

def _reading_summary(analysis: str, stages, per_layer: dict) -> dict:
    mean = {"embedding": float(np.mean([v["embedding"] for v in per_layer.values()]))}
    for kind in ("attn", "cross_attn", "mlp"):
        mean[kind] = np.mean([v[kind] for v in per_layer.values()], axis=0).tolist()
    return {"analysis": analysis, "sim_type": "dot", "queries": 9, "stages": stages,
            "reader_layers": [int(layer) for layer in per_layer],
            "results": {"all": {"per_layer": per_layer, "mean": mean}}}


def test_figure5_shows_every_reader_layer(tmp_path):
    from genir_jax.paper.experiments import figure5_reading as fig5

    layout = _layout(tmp_path)
    stages = [[0, 1], [2, 3], [4, 5]]
    rng = np.random.default_rng(5)

    def shares(layers):
        out = {}
        for layer in layers:
            values = rng.random(10)
            values /= values.sum()
            out[str(layer)] = {"readers": 3 + layer, "embedding": float(values[0]), "attn": values[1:4].tolist(),
                               "cross_attn": values[4:7].tolist(), "mlp": values[7:10].tolist()}
        return out

    neurons, heads = shares([4, 5]), shares(range(6))
    for step, file, analysis, per_layer in (("neuron-reading", "neuron_reading_summary.json", "neuron_reading", neurons),
                                            ("crattn-reading", "crattn_reading_summary.json", "crattn_reading", heads)):
        layout.analysis(step).mkdir(parents=True)
        (layout.analysis(step) / file).write_text(json.dumps(_reading_summary(analysis, stages, per_layer)))
    section = fig5.render(layout)
    parts = section.markdown.split("cross-attention heads (top all")
    for text, per_layer, layers in ((parts[0], neurons, [4, 5]), (parts[1], heads, [2, 3, 4, 5])):
        headers, rows = _table(text, "reader layer")
        assert headers[3:] == [f"{b} %" for b in ("embedding", "attn I", "attn II", "attn III", "cross_attn I",
                                                  "cross_attn II", "cross_attn III", "mlp I", "mlp II", "mlp III")]
        assert [row[0] for row in rows] == [str(layer) for layer in layers] + ["mean over these layers"]
        for row, layer in zip(rows, layers):
            entry = per_layer[str(layer)]
            expected = 100 * np.asarray([entry["embedding"], *entry["attn"], *entry["cross_attn"], *entry["mlp"]])
            assert [float(cell) for cell in row[3:]] == pytest.approx(expected, abs=0.051)
            assert row[1] == {2: "II", 3: "II", 4: "III", 5: "III"}[layer] and int(row[2]) == entry["readers"]
        mean = np.mean([[per_layer[str(l)]["embedding"], *per_layer[str(l)]["attn"], *per_layer[str(l)]["cross_attn"],
                         *per_layer[str(l)]["mlp"]] for l in layers], axis=0)
        assert [float(cell) for cell in rows[-1][3:]] == pytest.approx(100 * mean, abs=0.051)
    assert section.figures[0].read_bytes()[:4] == b"\x89PNG"


def test_figure5_title_names_the_readers_last_stage(tmp_path, close_figures):
    """The readers are the last stage's: with two automatic stages the title says stage-II and its layers, not
    the paper's stage-III."""
    from genir_jax.paper.experiments import figure5_reading as fig5

    layout = _layout(tmp_path)
    stages = [[0, 1], [2, 3, 4, 5]]
    per_layer = {str(layer): {"readers": 2, "embedding": 0.1, "attn": [0.1, 0.1], "cross_attn": [0.2, 0.2],
                              "mlp": [0.2, 0.1]} for layer in (2, 3, 4, 5)}
    for step, file, analysis in (("neuron-reading", "neuron_reading_summary.json", "neuron_reading"),
                                 ("crattn-reading", "crattn_reading_summary.json", "crattn_reading")):
        layout.analysis(step).mkdir(parents=True)
        (layout.analysis(step) / file).write_text(json.dumps(_reading_summary(analysis, stages, per_layer)))
    fig, _ = fig5.draw(layout)
    assert "where stage-II (layers 2-5) MLP neurons" in fig._suptitle.get_text()


# --------------------------------------------------------------------------------------------------
# Table 4: both rankings, each labelled, with intervals over the test queries
# --------------------------------------------------------------------------------------------------

def _circuit_record(layout, rng, queries: int = 40):
    """minimal_circuit.json from synthetic rankings (`circuit_report`): ranked docid indices per query, the
    full-vocabulary ranking with word tokens (-1) above the docid for some queries."""
    from genir_jax.analysis.circuit import PAPER_CIRCUIT, circuit_report
    from genir_jax.analysis.circuit_runs import write_circuit

    doc_ids = [f"d{i}" for i in range(12)]
    query_ids = [f"t{i}" for i in range(queries)]
    qrels = {q: {doc_ids[i % 12]: 1} for i, q in enumerate(query_ids)}
    docid_top = np.stack([np.stack([rng.permutation(12) for _ in query_ids]) for _ in range(2)])
    full_top = docid_top.copy()
    full_top[:, rng.random(queries) < 0.4, 0] = -1  # a word token ranked first
    logits = np.sort(rng.random(docid_top.shape), axis=-1)[..., ::-1]
    rankings = {"full vocabulary": (full_top, logits, None), "docid tokens only": (docid_top, logits, None)}
    report, runs = circuit_report(PAPER_CIRCUIT, [[0, 1], [2, 3], [4, 5]], query_ids, doc_ids, rankings, qrels,
                                  correct_queries=9, padding="masked padding")
    write_circuit(layout.analysis("circuit"), report, runs, {"method": "thirds", "stages": [[0, 1], [2, 3], [4, 5]]},
                  "full")
    return report, docid_top, full_top


def test_table4_shows_both_rankings_with_intervals(tmp_path):
    from genir_jax.analysis.evidence import bootstrap, ratio
    from genir_jax.paper.experiments import table4_minimal_circuit as table4

    layout = _layout(tmp_path)
    rng = np.random.default_rng(4)
    report, docid_top, full_top = _circuit_record(layout, rng)
    text = table4.render(layout).markdown
    headers, rows = _table(text, "ranking")
    assert headers == ["ranking", "metric", "unpatched [95% CI]", "circuit [95% CI]", "circuit / unpatched [95% CI]",
                       "paper: circuit (relative)"]
    assert [row[0] for row in rows] == ["full vocabulary"] * 4 + ["docid tokens only"] * 4
    targets = np.arange(40) % 12
    for ranking, top in (("full vocabulary", full_top), ("docid tokens only", docid_top)):
        hits = (top[:, :, 0] == targets).astype(float)  # [2, N] per-query Hits@1 from the ranked ids
        row = next(r for r in rows if r[0] == ranking and r[1] == "Hits@1")
        assert row[2] == bootstrap(hits[0]).scaled(100).format(2) and row[2].endswith(f"(n=40)")
        assert row[3] == bootstrap(hits[1]).scaled(100).format(2)
        assert row[4] == ratio(hits[1], hits[0]).scaled(100).format(0, "%")
        assert f"{100 * hits[1].mean():.2f} [" in row[3]
    assert "**full vocabulary**" in text and "**docid tokens only**" in text and "95% bootstrap" in text


def test_table3_reports_first_each_and_every_step_for_docid_sequences(tmp_path):
    """Naive / semantic docids: the share of correct queries whose docid token keeps rank 0 at the first step,
    at each step and at every step, each with its bootstrap interval and query count."""
    from genir_jax.analysis.evidence import share
    from genir_jax.analysis.stage_patching import STEP_RANKS_JSON
    from genir_jax.paper.experiments import table3_stage_patching as table3

    layout = _layout(tmp_path)
    rng = np.random.default_rng(5)
    lengths = rng.integers(2, 5, size=30)  # docids of 2-4 tokens (EOS included)
    steps = {(mode, component, stage): [rng.choice([0, 0, 0, 1, 7], size=n).tolist() for n in lengths]
             for mode in ("zero", "mean") for component in ("mlp", "cross_attn", "attn") for stage in range(3)}
    _stage_patching_csv(layout, {key: [max(q) for q in value] for key, value in steps.items()})
    (layout.analysis("patch-stages") / STEP_RANKS_JSON).write_text(json.dumps(
        {f"{stage}-{component}-{mode}": value for (mode, component, stage), value in steps.items()}))
    text = table3.render(layout).markdown
    headers, rows = _table(text.split("Multi-token docids")[1], "mode")
    assert headers == ["mode", "component", "stage", "first step", "step 1", "step 2", "step 3", "step 4",
                       "every step"]
    assert len(rows) == len(steps)
    for row in rows:
        queries = steps[(row[0], row[1], "I II III".split().index(row[2]))]
        expected = [share([q[0] == 0 for q in queries])]
        expected += [share([q[t] == 0 for q in queries if len(q) > t]) for t in range(4)]
        expected += [share([max(q) == 0 for q in queries])]
        assert row[3:] == [interval.scaled(100).format(1, "%") for interval in expected]
        assert row[3].endswith("(n=30)") and row[-1].endswith("(n=30)")
        assert row[7].endswith(f"(n={int(np.sum(lengths > 3))})")  # step 4: the four-token docids only
    assert "first decoding step" in text and "every step (greedy decoding still gives the whole docid)" in text


def test_table4_reports_first_each_and_every_step_for_docid_sequences(tmp_path):
    """Naive / semantic Table 4: the circuit's first-step, per-step and every-step (greedy Hits@1) shares of test
    queries at rank 0, each with its interval and query count, from the teacher-forced step ranks."""
    from genir_jax.analysis.circuit import PAPER_CIRCUIT, sequence_circuit_report
    from genir_jax.analysis.circuit_runs import write_circuit
    from genir_jax.analysis.evidence import share
    from genir_jax.paper.experiments import table4_minimal_circuit as table4

    layout = _layout(tmp_path)
    rng = np.random.default_rng(6)
    queries, doc_ids = 25, [f"d{i}" for i in range(10)]
    query_ids = [f"t{i}" for i in range(queries)]
    qrels = {q: {doc_ids[i % 10]: 1} for i, q in enumerate(query_ids)}
    indices = np.stack([np.stack([rng.permutation(10) for _ in query_ids]) for _ in range(2)])
    scores = np.sort(rng.random(indices.shape), axis=-1)[..., ::-1]
    lengths = rng.integers(2, 4, size=queries)
    steps = np.full((2, queries, 3), -1)
    for k in range(2):
        for q, n in enumerate(lengths):
            steps[k, q, :n] = rng.choice([0, 0, 2], size=n)
    report, runs = sequence_circuit_report(PAPER_CIRCUIT, [[0, 1], [2, 3], [4, 5]], query_ids, doc_ids, indices,
                                           scores, qrels, steps, rng.normal(size=(2, queries)), correct_queries=7,
                                           scheme="naive")
    write_circuit(layout.analysis("circuit"), report, runs, {"method": "thirds", "stages": [[0, 1], [2, 3], [4, 5]]},
                  "full")
    text = table4.render(layout).markdown
    headers, rows = _table(text, "model")
    assert headers == ["model", "first step", "step 1", "step 2", "step 3", "every step (greedy Hits@1)",
                       "mean log-probability"]
    for k, row in enumerate(rows):
        real = steps[k] >= 0
        expected = [share(steps[k, :, 0] == 0)] + [share(steps[k, real[:, t], t] == 0) for t in range(3)]
        expected.append(share(np.all((steps[k] == 0) | ~real, axis=1)))
        assert row[1:6] == [interval.scaled(100).format(1, "%") for interval in expected]
        assert row[4].endswith(f"(n={int(np.sum(lengths == 3))})")
    assert report["patched"]["greedy Hits@1"] == pytest.approx(np.mean(np.all((steps[1] == 0) | (steps[1] < 0), 1)))
    assert report["patched"]["first-step Hits@1"] == pytest.approx(np.mean(steps[1, :, 0] == 0))
    _, retrieval = _table(text, "ranking")
    assert [row[1] for row in retrieval] == ["Hits@1", "Recall@5", "Hits@10", "MRR@10"]
    hits = (indices[:, :, 0] == np.arange(queries) % 10).astype(float)
    assert retrieval[0][2].startswith(f"{100 * hits[0].mean():.2f} [") and retrieval[0][2].endswith("(n=25)")


@pytest.mark.slow  # about a minute on 2 cores: run by the full suite (.ci/run), not the quick one
def test_table4_sequence_run_keeps_each_steps_rank_of_the_circuit(tmp_path, t5_tokenizer, monkeypatch):
    """The naive Table 4 run on a tiny random model: the per-step ranks it keeps (without and with the circuit)
    are those of the teacher-forced docid under the same interventions, and the shares follow from them."""
    from genir_jax.analysis import inputs as analysis_inputs

    # the random model does not decode its correct_valid pairs greedily; the pairs check has its own tests
    # (tests/cli/test_correct_pairs.py) and this one is about the ranks the run keeps
    monkeypatch.setattr(analysis_inputs, "check_correct_pairs", lambda *args, **kwargs: None)
    from genir_jax.analysis.circuit import PAPER_CIRCUIT, circuit_interventions
    from genir_jax.analysis.inputs import tokenize_for_analysis
    from genir_jax.base.io import write_json
    from genir_jax.checkpoints.hf import PretrainedModel, save_pretrained
    from genir_jax.core.config import t5_v1_0
    from genir_jax.core.model import init_params
    from genir_jax.core.sites import COMPONENT_SITES
    from genir_jax.docids.sequence_targets import (pad_targets, step_ranks, teacher_forced_logits,
                                                   teacher_forcing_inputs)
    from genir_jax.interp.interventions import mean_activations
    from genir_jax.paper.experiments import table4_minimal_circuit as table4

    layout = rp.Layout(tmp_path)
    config = t5_v1_0(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=3, num_heads=2)
    params = init_params(config, 1)
    params = {**params, "shared": np.asarray(params["shared"]) * 3.0}
    save_pretrained(layout.full, PretrainedModel(config, params, t5_tokenizer))
    docids = {f"d{i}": str(10 * i + 3) for i in range(6)}
    write_json(layout.full / "docids.json", {"format": 1, "scheme": "naive", "docids": docids})
    layout.data.mkdir(parents=True)
    texts = ["who wrote the books", "capital of france", "when did the war end", "spider legs", "eiffel tower",
             "mona lisa painter"]
    for split in ("val", "test"):
        write_json(layout.queries(split), [{"id": f"{split}{i}", "query": t, "relevant_docs": [f"d{i}"]}
                                           for i, t in enumerate(texts)])
        layout.qrels(split).write_text("".join(f"{split}{i} 0 d{i} 1\n" for i in range(6)))
    layout.correct_valid.parent.mkdir(parents=True)
    write_json(layout.correct_valid, [[docids[f"d{i}"], f"val{i}"] for i in (0, 2, 3)])
    settings = rp.Settings(dataset="squad-dev", preset="tiny", docids="naive", progress=False)
    table4.run_circuit(layout, settings, table4.Config(stages="0,1,2", batch_size=4))
    report = json.loads((layout.analysis("circuit") / "minimal_circuit.json").read_text())
    sequences = [t5_tokenizer(docids[f"d{i}"])["input_ids"] for i in range(6)]
    targets, mask = pad_targets(sequences)
    ids, attention = tokenize_for_analysis(t5_tokenizer, texts)
    val = [t5_tokenizer(docids[f"d{i}"])["input_ids"] for i in (0, 2, 3)]
    val_ids, val_mask = tokenize_for_analysis(t5_tokenizer, [texts[i] for i in (0, 2, 3)])
    val_targets, _ = pad_targets(val, targets.shape[1])
    means = mean_activations(config, params, val_ids, val_mask, [f"decoder.*.{s}" for s in COMPONENT_SITES.values()],
                             decoder_input_ids=teacher_forcing_inputs(val_targets, config.decoder_start_token_id),
                             progress=False)
    sweep = circuit_interventions(config, PAPER_CIRCUIT, [[0], [1], [2]], means)
    for k in range(2):
        logits = teacher_forced_logits(config, params, ids, attention, targets,
                                       interventions=sweep.config(config, k) or None)
        expected = np.asarray(step_ranks(logits, targets, mask))
        assert report["per_query"]["step_ranks"][k] == [row[row >= 0].tolist() for row in expected]
        name = ("unpatched", "patched")[k]
        assert report[name]["first-step Hits@1"] == pytest.approx(np.mean(expected[:, 0] == 0))
        assert report[name]["greedy Hits@1"] == pytest.approx(np.mean(np.all((expected == 0) | (expected < 0), 1)))
    assert "every step (greedy Hits@1)" in table4.render(layout).markdown


def test_table1_gives_every_metric_an_interval_over_the_queries(tmp_path):
    from genir_jax.analysis.evidence import bootstrap
    from genir_jax.docids.retrieval import per_query_metrics, write_trec_run
    from genir_jax.paper.experiments import table1_retrieval as table1

    layout = _layout(tmp_path)
    rng = np.random.default_rng(7)
    layout.data.mkdir(parents=True)
    qrels = {}
    for split, count in (("test", 30), ("val", 20)):
        qrels[split] = {f"{split}{i}": {f"d{i % 12}": 1} for i in range(count)}
        layout.qrels(split).write_text("".join(f"{q} 0 {d} 1\n" for q, docs in qrels[split].items() for d in docs))
    runs = {}
    for name, directory, split in (("dsi", layout.eval_test, "test"), ("bm25", layout.bm25_test, "test"),
                                   ("val", layout.eval_val, "val")):
        directory.mkdir(parents=True)
        runs[name] = {q: [(f"d{j}", float(12 - r)) for r, j in enumerate(rng.permutation(12))] for q in qrels[split]}
        write_trec_run(directory / "run.trec", runs[name], name)
    (layout.eval_val / "metrics.json").write_text(json.dumps({"metrics": {"Hits@1": 0.1, "queries": 20},
                                                              "correct_first": 2}))
    (layout.full / "train.json").write_text(json.dumps({}))
    text = table1.render(layout).markdown
    headers, rows = _table(text, "model")
    assert headers[1:5] == ["Hits@1 [95% CI] (n)", "R@5 [95% CI] (n)", "Hits@10 [95% CI] (n)", "MRR@10 [95% CI] (n)"]
    for row, name in zip(rows, ("dsi", "bm25")):
        values = per_query_metrics(runs[name], qrels["test"])
        for cell, metric in zip(row[1:5], ("Hits@1", "Recall@5", "Hits@10", "MRR@10")):
            assert cell == bootstrap([v[metric] for v in values.values()]).scaled(100).format(2)
            assert cell.endswith("(n=30)")
    validation = per_query_metrics(runs["val"], qrels["val"])
    assert f"Hits@1 {bootstrap([v['Hits@1'] for v in validation.values()]).scaled(100).format(2)}" in text


def test_figure4_component_sums_carry_intervals(tmp_path):
    from genir_jax.analysis.evidence import bootstrap, share
    from genir_jax.analysis.residual import LENS_SITES, ResidualRankResult, write_residual_rank
    from genir_jax.paper.experiments import figure4_rank_development as fig4

    layout = _layout(tmp_path)
    rng = np.random.default_rng(8)
    queries = 25
    stats = {name: rng.integers(0, 64, size=(queries, LAYERS)) for name in
             ("docid_min", "docid_max", "non_docid_min", "non_docid_max", "non_docid_median", "docid_sum")}
    sums = rng.choice([0, 0, 3, 12, 150], size=(queries, 2))
    write_residual_rank(layout.analysis("residual-rank"), ResidualRankResult(
        query_ids=[f"q{i}" for i in range(queries)], contributions=rng.random((queries, LAYERS, 3, 5), dtype=np.float32),
        lens_ranks=rng.integers(0, 5, size=(queries, LAYERS, len(LENS_SITES))), vocab_stats=stats, docid_count=16,
        vocab_size=64, sum_ranks=sums, final_ranks=np.zeros(queries, np.int64)))
    headers, rows = _table(fig4.render(layout).markdown, "logits from")
    for row, column in zip(rows, (0, 1)):
        ranks = sums[:, column]
        assert row[1:4] == [share(ranks > t).scaled(100).format(2) for t in (0, 10, 100)]
        assert row[4] == bootstrap(ranks, np.median).format(1) and row[4].endswith(f"(n={queries})")


def test_figure4_steps_cells_carry_intervals_over_the_steps_queries(tmp_path):
    from genir_jax.analysis.evidence import bootstrap
    from genir_jax.analysis.sequence_logit_lens import SequenceLensResult, write_sequence_logit_lens
    from genir_jax.paper.experiments import figure4_steps_rank_development as steps_figure

    layout = _layout(tmp_path)
    rng = np.random.default_rng(9)
    queries, width = 12, 3
    lengths = rng.integers(2, width + 1, size=queries)
    lens = rng.integers(0, 50, size=(queries, width, LAYERS, 3))
    contributions = rng.random((queries, width, LAYERS, 3, 5))
    for n, length in enumerate(lengths):
        lens[n, length:], contributions[n, length:] = -1, np.nan
    write_sequence_logit_lens(layout.analysis("steps-logit-lens"),
                              SequenceLensResult(lens, contributions, lengths, np.zeros((queries, width), np.int64)),
                              [f"q{i}" for i in range(queries)])
    text = steps_figure.render(layout).markdown
    headers, rows = _table(text, "layer")
    assert headers[1:] == ["step 1", "step 2", "step 3", "last step (EOS)"]
    chosen = [np.ones(queries, bool), lengths > 1, lengths > 2]
    for layer, row in enumerate(rows):
        for t in range(width):
            assert row[1 + t] == bootstrap(lens[chosen[t], t, layer, 0].astype(np.float64)).format(1)
        last = lens[np.arange(queries), lengths - 1, layer, 0].astype(np.float64)
        assert row[4] == bootstrap(last).format(1) and row[4].endswith(f"(n={queries})")
    _, rows = _table(text, "step")
    ratio = contributions[:, 1, :, 0, :]  # step 2, func ratio
    assert rows[1][1] == bootstrap(ratio[lengths > 1][:, [0, 1], 0].mean(axis=1)).format(2)  # stage I, self-attn
# Figures a reviewer would accept (issue 23, item 4): the Figure objects the panels draw
# --------------------------------------------------------------------------------------------------

def _residual_layout(tmp_path, queries: int = 7, layers: int = LAYERS):
    from genir_jax.analysis.residual import LENS_SITES, ResidualRankResult, write_residual_rank

    layout = _layout(tmp_path, layers)
    rng = np.random.default_rng(7)
    stats = {name: rng.integers(0, 64, size=(queries, layers)) for name in
             ("docid_min", "docid_max", "non_docid_min", "non_docid_max", "non_docid_median")}
    stats["docid_sum"] = rng.integers(120, 600, size=(queries, layers))
    result = ResidualRankResult(query_ids=[f"q{i}" for i in range(queries)],
                                contributions=rng.random((queries, layers, 3, 5), dtype=np.float32),
                                lens_ranks=rng.integers(0, 50, size=(queries, layers, len(LENS_SITES))),
                                vocab_stats=stats, docid_count=16, vocab_size=64,
                                sum_ranks=rng.integers(0, 200, size=(queries, 2)), final_ranks=np.zeros(queries, np.int64))
    write_residual_rank(layout.analysis("residual-rank"), result)
    return layout


def _legend_outside(fig, legend, axes) -> bool:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    return all(not box.overlaps(axis.get_window_extent(renderer)) for axis in axes)


def _integer_layer_ticks(axis) -> bool:
    low, high = axis.get_xlim()
    ticks = [t for t in axis.get_xticks() if low <= t <= high]
    return len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


def _stage_labels(axis) -> list[str]:
    return [t.get_text() for t in axis.texts]


@pytest.fixture
def close_figures():
    from genir_jax.base.figures import pyplot

    yield
    pyplot().close("all")


def test_figure3_error_bars_are_said_to_be_standard_deviations(tmp_path, close_figures):
    from matplotlib.container import ErrorbarContainer
    from genir_jax.paper.experiments import figure3_residual_contributions as fig3

    layout = _residual_layout(tmp_path)
    fig, _ = fig3.draw(layout)
    axes = fig.axes
    for axis in axes:  # both panels: ratio and cosine, three components with error bars each
        bars = [c for c in axis.containers if isinstance(c, ErrorbarContainer)]
        assert len(bars) == 3 and all(c.has_yerr for c in bars)
        assert _integer_layer_ticks(axis)
        assert _stage_labels(axis) == ["I (0-1)", "II (2-3)", "III (4-5)"]
    legend = axes[1].get_legend()
    assert "standard deviation" in legend.get_title().get_text()
    assert _legend_outside(fig, legend, axes)
    title = fig.get_suptitle()
    assert "7 correct validation queries" in title and "DSI T5, 2+6 layers, d_model 8" in title
    assert "error bars: ±1 standard deviation over the queries" in fig3.render(layout).markdown


def test_figure4_legend_sits_beside_the_lines_and_the_title_says_what(tmp_path, close_figures):
    from genir_jax.paper.experiments import figure4_rank_development as fig4

    fig, _ = fig4.draw(_residual_layout(tmp_path, queries=9, layers=3))  # 3 layers: matplotlib would tick 0.5
    (axis,) = fig.axes
    assert _legend_outside(fig, axis.get_legend(), [axis]) and _integer_layer_ticks(axis)
    assert "logit lens" in axis.get_title() and "9 correct validation queries" in axis.get_title()
    assert _stage_labels(axis) == ["I (0)", "II (1)", "III (2)"]


def test_figure4_steps_draws_the_eos_line_under_the_steps(tmp_path, close_figures):
    from genir_jax.analysis.sequence_logit_lens import SUMMARY_JSON
    from genir_jax.paper.experiments import figure4_steps_rank_development as fig4s

    layout = _layout(tmp_path)
    ranks = {site: {"mean": np.linspace(8, 0, LAYERS).tolist()} for site, _ in fig4s.SITES}
    steps = [{"label": label, "queries": 5, "relevant_rank": ranks} for label in ("step 1", "step 2", "last step (EOS)")]
    directory = layout.analysis("steps-logit-lens")
    directory.mkdir(parents=True)
    (directory / SUMMARY_JSON).write_text(json.dumps({"num_decoder_layers": LAYERS, "num_queries": 5, "steps": steps}))
    fig, _ = fig4s.draw(layout)
    for axis in fig.axes:
        lines = {line.get_label().split(" (")[0]: line for line in axis.get_lines()}
        assert all(lines[step].get_zorder() > lines["last step"].get_zorder() for step in ("step 1", "step 2"))
        assert lines["step 2"].get_marker() not in (None, "None", "")
        assert _integer_layer_ticks(axis)
    assert _legend_outside(fig, fig.axes[-1].get_legend(), fig.axes)
    assert "5 correct validation queries" in fig.get_suptitle()


def test_figure5_keeps_bar_width_and_explains_its_axis(tmp_path, close_figures):
    from genir_jax.base.figures import CATEGORY_COLOURS
    from genir_jax.paper.experiments import figure5_reading as fig5
    from matplotlib.colors import to_hex

    layout = _layout(tmp_path)
    stages = [[0, 1], [2, 3], [4, 5]]
    shares = {"readers": 4, "embedding": 0.1, "attn": [0.1] * 3, "cross_attn": [0.1] * 3, "mlp": [0.1] * 3}
    for step, file, analysis, layers in (("neuron-reading", "neuron_reading_summary.json", "neuron_reading", [5]),
                                         ("crattn-reading", "crattn_reading_summary.json", "crattn_reading", range(6))):
        layout.analysis(step).mkdir(parents=True)
        summary = _reading_summary(analysis, stages, {str(layer): shares for layer in layers})
        (layout.analysis(step) / file).write_text(json.dumps(summary))
    fig, _ = fig5.draw(layout)
    neurons, heads = fig.axes
    low, high = neurons.get_xlim()
    assert high - low >= fig5.MIN_BAR_SLOTS  # one reader layer: one bar of ordinary width, not the whole panel
    assert all(patch.get_width() <= 0.7 + 1e-9 for patch in neurons.patches)
    colours = [to_hex(neurons.patches[b].get_facecolor()) for b in range(10)]  # one patch per bucket (1 layer)
    assert len(set(colours)) == 10 and set(colours) <= {c.lower() for c in CATEGORY_COLOURS}
    legend = heads.get_legend()
    assert _legend_outside(fig, legend, fig.axes) and all(t.get_fontsize() >= 8 for t in legend.get_texts())
    assert [t.get_text() for t in legend.get_texts()][-2:] == ["self-attention I (0-1)", "embedding"]
    assert neurons.get_ylabel() == "share of positive readings"
    assert any("dot product" in t.get_text() for t in fig.texts)
    assert "9 queries" in neurons.get_title() and "9 queries" in heads.get_title()
