"""Boundaries, argument order and axes: tests that catch off-by-one cutoffs, swapped same-typed arguments,
masks on the wrong axis and patches applied in the wrong order (each found as a surviving mutant)."""

from __future__ import annotations

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp import interventions as ivs
from genir_jax.data.corpus import Document, Query
from genir_jax.data.prepare import split_by_document, split_queries, split_squad
from genir_jax.data.sources import RawCorpus
from genir_jax.data.splits import allocate, split_groups
from genir_jax.interp.metrics import THRESHOLDS as BLOCK_THRESHOLDS
from genir_jax.interp.metrics import block_aggregates
from genir_jax.docids.retrieval import evaluate_run, per_query_metrics
from tests.hf_fixtures import padded_batch

# --------------------------------------------------------------------------------------------------
# Retrieval metrics: each cutoff at its boundary
# --------------------------------------------------------------------------------------------------

def _run_with_relevant_at(rank: int, length: int = 12) -> tuple[dict, dict]:
    """One query whose only relevant document sits at 1-based `rank` of a `length`-long ranking."""
    docs = [f"n{i}" for i in range(length)]
    docs[rank - 1] = "rel"
    run = {"q": [(d, float(length - i)) for i, d in enumerate(docs)]}
    return run, {"q": {"rel": 1}}


@pytest.mark.parametrize("metric, cutoff", [("Hits@1", 1), ("Recall@5", 5), ("Hits@10", 10), ("MRR@10", 10),
                                            ("nDCG@10", 10)])
def test_metric_cutoffs_flip_exactly_at_the_boundary(metric, cutoff):
    inside = per_query_metrics(*_run_with_relevant_at(cutoff))["q"][metric]
    outside = per_query_metrics(*_run_with_relevant_at(cutoff + 1))["q"][metric]
    assert inside > 0, f"{metric}: relevant document at rank {cutoff} must count"
    assert outside == 0, f"{metric}: relevant document at rank {cutoff + 1} must not count"


def test_metric_values_at_the_boundaries():
    at = {rank: per_query_metrics(*_run_with_relevant_at(rank))["q"] for rank in (1, 2, 5, 6, 10, 11)}
    assert at[1] == pytest.approx({"Hits@1": 1, "Hits@10": 1, "Recall@5": 1, "MRR@10": 1, "nDCG@10": 1})
    assert at[2]["Hits@1"] == 0 and at[2]["MRR@10"] == pytest.approx(0.5)
    assert at[5]["Recall@5"] == 1 and at[5]["MRR@10"] == pytest.approx(0.2)
    assert at[6]["Recall@5"] == 0 and at[6]["Hits@10"] == 1 and at[6]["MRR@10"] == pytest.approx(1 / 6)
    assert at[10]["MRR@10"] == pytest.approx(0.1) and at[10]["nDCG@10"] == pytest.approx(1 / np.log2(11))
    assert at[11] == {"Hits@1": 0, "Hits@10": 0, "Recall@5": 0, "MRR@10": 0, "nDCG@10": 0}


def test_recall_at_5_counts_relevant_documents_up_to_rank_5():
    """Two relevant documents at ranks 5 and 6: Recall@5 is 1/2 (a cutoff of 6 would give 1, of 4 give 0)."""
    docs = [f"n{i}" for i in range(10)]
    docs[4], docs[5] = "a", "b"
    run = {"q": [(d, float(10 - i)) for i, d in enumerate(docs)]}
    assert per_query_metrics(run, {"q": {"a": 1, "b": 1}})["q"]["Recall@5"] == pytest.approx(0.5)


def test_evaluate_run_averages_over_queries_at_the_boundaries():
    run, qrels = {}, {}
    for rank in (1, 2, 5, 6, 10, 11):
        one_run, one_qrels = _run_with_relevant_at(rank)
        run[f"q{rank}"], qrels[f"q{rank}"] = one_run["q"], one_qrels["q"]
    metrics = evaluate_run(run, qrels)
    assert metrics["queries"] == 6
    assert metrics["Hits@1"] == pytest.approx(1 / 6)
    assert metrics["Recall@5"] == pytest.approx(3 / 6)
    assert metrics["Hits@10"] == pytest.approx(5 / 6)
    assert metrics["MRR@10"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 6 + 1 / 10) / 6)


# --------------------------------------------------------------------------------------------------
# Rank thresholds of the analyses
# --------------------------------------------------------------------------------------------------

BOUNDARY_RANKS = np.array([0, 1, 5, 6, 10, 11, 100, 101])


def test_stage_patching_fractions_at_their_thresholds():
    from genir_jax.analysis.stage_patching import StageConfig, StagePatchingResult

    ranks = np.stack([BOUNDARY_RANKS, np.zeros(8, int), np.full(8, 101)])
    rows = [StageConfig("mlp", 0, "zero"), StageConfig("attn", 1, "mean"), StageConfig("cross_attn", 2, "t5")]
    result = StagePatchingResult(rows=rows, ranks=ranks, sweep=None)
    first, zeros, far = result.fractions()
    # above 0: 7 of 8; above 5: 5 (6, 10, 11, 100, 101); above 10: 3 (11, 100, 101); above 100: 1
    assert {k: first[k] for k in ("!=0", ">5", ">10", ">100")} == {"!=0": 7 / 8, ">5": 5 / 8, ">10": 3 / 8,
                                                                    ">100": 1 / 8}
    assert (first["component"], first["stage"], first["mode"]) == ("mlp", 0, "zero")
    assert all(zeros[k] == 0.0 for k in ("!=0", ">5", ">10", ">100"))
    assert all(far[k] == 1.0 for k in ("!=0", ">5", ">10", ">100"))
    assert result.ranks_by_key() == {"0-mlp-zero": BOUNDARY_RANKS.tolist(), "1-attn-mean": [0] * 8,
                                     "2-cross_attn-t5": [101] * 8}


def test_block_aggregates_thresholds_and_hits_at_their_boundaries():
    assert BLOCK_THRESHOLDS == (0, 5, 10, 100)
    values = {"rank": np.stack([BOUNDARY_RANKS, BOUNDARY_RANKS + 1])}
    clean = {"rank": np.zeros(8, np.int32)}
    out = block_aggregates(values, clean, ["rank"], hits=[1, 5, 6, 10, 11, 100, 101])
    np.testing.assert_array_equal(out["rank>0"], [7, 8])
    # rows: 0,1,5,6,10,11,100,101 and 1,2,6,7,11,12,101,102
    np.testing.assert_array_equal(out["rank>5"], [5, 6])
    np.testing.assert_array_equal(out["rank>10"], [3, 4])
    np.testing.assert_array_equal(out["rank>100"], [1, 2])
    # hits@k: rank < k
    np.testing.assert_array_equal(out["hits@1"], [1, 0])
    np.testing.assert_array_equal(out["hits@5"], [2, 2])
    np.testing.assert_array_equal(out["hits@6"], [3, 2])
    np.testing.assert_array_equal(out["hits@10"], [4, 4])
    np.testing.assert_array_equal(out["hits@11"], [5, 4])
    np.testing.assert_array_equal(out["hits@100"], [6, 6])
    np.testing.assert_array_equal(out["hits@101"], [7, 6])
    np.testing.assert_array_equal(out["rank"], [BOUNDARY_RANKS.sum(), BOUNDARY_RANKS.sum() + 8])
    np.testing.assert_array_equal(out["rank_effect"], out["rank"])  # clean ranks are all 0


def test_block_aggregates_hits_use_the_docid_rank_when_computed():
    values = {"rank": np.array([[0, 50, 50]]), "docid_rank": np.array([[0, 0, 9]])}
    clean = {"rank": np.zeros(3, int), "docid_rank": np.zeros(3, int)}
    out = block_aggregates(values, clean, ["rank", "docid_rank"], hits=[1, 10])
    np.testing.assert_array_equal(out["hits@1"], [2])
    np.testing.assert_array_equal(out["hits@10"], [3])
    np.testing.assert_array_equal(out["docid_rank>5"], [1])
    np.testing.assert_array_equal(out["rank>5"], [2])


# --------------------------------------------------------------------------------------------------
# Splits: validation and test fractions are not interchangeable
# --------------------------------------------------------------------------------------------------

def test_allocate_keeps_validation_and_test_apart():
    assert allocate([40], 0.15, 0.05) == [(32, 6, 2)]
    assert allocate([40], 0.05, 0.15) == [(32, 2, 6)]
    assert allocate([20, 20], 0.15, 0.05) == [(16, 3, 1), (16, 3, 1)]
    # capacity short: slots go one at a time to the larger shortfall (ties: validation)
    assert allocate([3], 0.5, 0.25, min_train=1) == [(1, 2, 0)]
    assert allocate([3], 0.25, 0.5, min_train=1) == [(1, 1, 1)]
    assert allocate([4], 0.25, 0.5, min_train=3) == [(3, 0, 1)]
    assert allocate([4], 0.5, 0.25, min_train=3) == [(3, 1, 0)]


def test_split_groups_with_unequal_fractions_puts_each_item_where_documented():
    groups = [[f"a{i}" for i in range(20)], [f"b{i}" for i in range(20)]]
    splits = split_groups(groups, 0.15, 0.05, seed=3)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [32, 6, 2]
    rng = np.random.default_rng(3)
    expected = {"train": [], "val": [], "test": []}
    for group in groups:
        order = rng.permutation(20)
        for index, item in enumerate(group):
            position = int(np.where(order == index)[0][0])
            expected["val" if position < 3 else "test" if position < 4 else "train"].append(item)
    assert splits == expected
    swapped = split_groups(groups, 0.05, 0.15, seed=3)
    assert [len(swapped[s]) for s in ("train", "val", "test")] == [32, 2, 6]
    assert set(swapped["val"]) < set(splits["val"])  # the same permutations: first positions go to validation


def _queries(n, docs):
    return [Query(f"q{i}", f"question {i}", (docs[i % len(docs)],)) for i in range(n)]


def test_squad_split_with_unequal_fractions():
    documents = [Document("0", "first paragraph"), Document("1", "second paragraph")]
    queries = _queries(40, ["0", "1"])
    raw = RawCorpus(documents, queries, groups=[list(range(0, 40, 2)), list(range(1, 40, 2))])
    prepared = split_squad(raw, 5, 0.15, 0.05)
    counts = prepared.counts()
    assert (counts["train_queries"], counts["val_queries"], counts["test_queries"]) == (32, 6, 2)
    groups = [[queries[i] for i in group] for group in raw.groups]
    assert prepared.splits == split_groups(groups, 0.15, 0.05, seed=5, min_train=1)
    rng = np.random.default_rng(5)
    for group in groups:
        order = rng.permutation(len(group))
        assert {q.id for q in (group[i] for i in order[:3])} <= {q.id for q in prepared.splits["val"]}
        assert group[order[3]].id in {q.id for q in prepared.splits["test"]}


def test_nq_oracle_split_with_unequal_fractions():
    documents = [Document(f"d{i}", f"text {i}") for i in range(40)]
    queries = _queries(80, [d.id for d in documents])  # two queries per document
    prepared = split_by_document(RawCorpus(documents, queries), 2, 0.15, 0.05)
    order = np.random.default_rng(2).permutation(40)
    val_docs, test_docs = {f"d{i}" for i in order[:6]}, {f"d{i}" for i in order[6:8]}
    assert {q.relevant_docs[0] for q in prepared.splits["val"]} == val_docs
    assert {q.relevant_docs[0] for q in prepared.splits["test"]} == test_docs
    assert (len(prepared.splits["val"]), len(prepared.splits["test"]), len(prepared.splits["train"])) == (12, 4, 64)


def test_query_split_with_unequal_fractions():
    documents = [Document("d0", "text")]
    queries = _queries(40, ["d0"])
    prepared = split_queries(RawCorpus(documents, queries), 9, 0.15, 0.05)
    order = np.random.default_rng(9).permutation(40)
    assert {q.id for q in prepared.splits["val"]} == {f"q{i}" for i in order[:6]}
    assert {q.id for q in prepared.splits["test"]} == {f"q{i}" for i in order[6:8]}
    assert len(prepared.splits["train"]) == 32


def test_prepare_data_command_passes_fractions_in_order(tmp_path, capsys):
    import json

    from genir_jax.cli.main import main

    data_dir = tmp_path / "data"
    (data_dir / "squad-v1.1-dev").mkdir(parents=True)
    squad = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": "Paris is the capital of France.", "qas": [
            {"id": f"q{i}", "question": f"question {i}?", "answers": []} for i in range(40)]}]}]}
    (data_dir / "squad-v1.1-dev" / "dev-v1.1.json").write_text(json.dumps(squad), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["prepare-data", "--dataset", "squad-dev", "--data-dir", str(data_dir), "-o", str(out),
                 "--val-fraction", "0.15", "--test-fraction", "0.05", "--seed", "4"]) == 0
    capsys.readouterr()
    val = json.loads((out / "val_queries.json").read_text())
    test = json.loads((out / "test_queries.json").read_text())
    train = json.loads((out / "train_queries.json").read_text())
    assert (len(train), len(val), len(test)) == (32, 6, 2)
    order = np.random.default_rng(4).permutation(40)
    assert {q["id"] for q in val} == {f"q{i}" for i in order[:6]}
    assert {q["id"] for q in test} == {f"q{i}" for i in order[6:8]}
    manifest = json.loads((out / "prepare.json").read_text())
    assert manifest["options"]["val_fraction"] == 0.15 and manifest["options"]["test_fraction"] == 0.05


# --------------------------------------------------------------------------------------------------
# Masks on the right axis of every site kind
# --------------------------------------------------------------------------------------------------

CONFIG = gj.t5_v1_0(vocab_size=96, d_model=24, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=2,
                           num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=20,
                           dropout_rate=0.0)
GATED = gj.t5_v1_1(vocab_size=96, d_model=24, d_kv=6, d_ff=48, num_layers=1, num_decoder_layers=1,
                          num_heads=4, dropout_rate=0.0)
ENC_LEN, DEC_LEN = 7, 3

# per-example axis of each kind (sites.py: q/z [T, H, K]; k/v [S, H, K]; scores/pattern [H, T, S]; MLP [T, F])
HEAD_AXIS = {"hook_q": 1, "hook_k": 1, "hook_v": 1, "hook_z": 1, "hook_attn_scores": 0, "hook_pattern": 0}
POSITION_AXIS = {"hook_q": 0, "hook_k": 0, "hook_v": 0, "hook_z": 0, "hook_attn_scores": 1, "hook_pattern": 1}
ATTENTION_SITES = [f"{prefix}.{leaf}" for prefix in ("encoder.1.attn", "decoder.1.attn", "decoder.0.cross_attn")
                   for leaf in HEAD_AXIS]


@pytest.fixture(scope="module")
def model():
    params = gj.init_params(CONFIG, 3)
    ids, mask, dec = padded_batch(CONFIG.vocab_size, [ENC_LEN, 5, 6], seed=1, decoder_steps=DEC_LEN)
    return params, (ids, mask, dec)


def _site_activation(config, params, batch, site, iv=None):
    _, cache = gj.forward_with_cache(config, params, *batch, interventions=iv, cache_sites=[site])
    return np.asarray(cache[site])


def _check_only_selected_zeroed(clean, patched, axis, index, site):
    """`patched` is 0 exactly on index `index` of per-example axis `axis` and equals `clean` elsewhere."""
    selected = np.zeros(clean.shape, bool)
    where = [slice(None)] * clean.ndim
    where[axis + 1] = index  # + 1: the batch axis
    selected[tuple(where)] = True
    assert np.all(patched[selected] == 0), site
    np.testing.assert_array_equal(patched[~selected], clean[~selected], err_msg=site)
    assert np.any(clean[selected] != 0), f"{site}: the selected slice was already 0; the test proves nothing"


POSITION_SITES = ATTENTION_SITES + [
    f"{stack}.1.{leaf}" for stack in ("encoder", "decoder")
    for leaf in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
                 "mlp.hook_pre", "mlp.hook_post")] + [
    "decoder.1.hook_cross_attn_out", "decoder.1.hook_resid_mid_cross", "hook_embed", "decoder.hook_embed",
    "encoder_final_ln.hook_normalized", "decoder_final_ln.hook_normalized", "encoder.hook_out", "decoder.hook_out"]
STACK_LEVEL = ("hook_embed", "decoder.hook_embed", "encoder_final_ln.hook_normalized",
               "decoder_final_ln.hook_normalized", "encoder.hook_out", "decoder.hook_out")


def _position_length(site: str) -> int:
    stack, leaf = site.split(".")[0], site.split(".")[-1]
    if ".cross_attn." in site and leaf in ("hook_k", "hook_v"):
        return ENC_LEN  # keys and values of cross-attention run over the encoder's positions
    return ENC_LEN if stack in ("encoder", "hook_embed", "encoder_final_ln") else DEC_LEN


def _selection(site: str, mask: np.ndarray) -> np.ndarray:
    """The per-example selection of a `site_masks` mask (layer and batch axes removed), checked to be
    the same on every selected layer."""
    mask = np.asarray(mask)
    if site in STACK_LEVEL:
        assert mask.shape[0] == 1
        return mask[0]
    layer = int(site.split(".")[1])
    assert mask.shape[1] == 1
    others = [l for l in range(mask.shape[0]) if l != layer]
    assert not np.any(mask[others]), f"{site}: other layers selected"
    return mask[layer, 0]


def _single_axis(site, selection, axis, size, chosen):
    """`selection` varies along `axis` only (others broadcast as 1), with ones exactly at `chosen`."""
    expected_shape = [1] * selection.ndim
    expected_shape[axis] = size
    assert selection.shape == tuple(expected_shape), f"{site}: mask {selection.shape}, expected {expected_shape}"
    vector = selection.reshape(-1)
    np.testing.assert_array_equal(np.flatnonzero(vector), sorted(chosen), err_msg=site)


@pytest.mark.parametrize("site", ATTENTION_SITES)
def test_head_masks_lie_on_the_head_axis(site):
    masks = ivs.site_masks(CONFIG, [site], heads=[1, 3])
    (mask,) = masks.values()
    _single_axis(site, _selection(site, mask), HEAD_AXIS[site.split(".")[-1]], CONFIG.num_heads, [1, 3])


@pytest.mark.parametrize("site", POSITION_SITES)
def test_position_masks_lie_on_the_position_axis(site):
    length = _position_length(site)
    masks = ivs.site_masks(CONFIG, [site], positions=[0, length - 2], length=length)
    (mask,) = masks.values()
    axis = POSITION_AXIS.get(site.split(".")[-1], 0)
    _single_axis(site, _selection(site, mask), axis, length, [0, length - 2])


@pytest.mark.parametrize("site", ["decoder.0.mlp.hook_pre", "decoder.1.mlp.hook_post", "encoder.0.mlp.hook_pre"])
def test_neuron_masks_lie_on_the_neuron_axis(site):
    (mask,) = ivs.site_masks(CONFIG, [site], neurons=[5, 47]).values()
    _single_axis(site, _selection(site, mask), 1, CONFIG.d_ff, [5, 47])


@pytest.mark.parametrize("site", ["decoder.0.hook_mlp_out", "encoder.1.hook_resid_post", "hook_embed"])
def test_units_on_sites_without_that_axis_are_refused(site):
    with pytest.raises(ivs.InterventionError, match="no head axis"):
        ivs.site_masks(CONFIG, [site], heads=[0])
    with pytest.raises(ivs.InterventionError, match="no neuron axis"):
        ivs.site_masks(CONFIG, [site], neurons=[0])


def test_positions_heads_and_layers_together_select_their_intersection():
    masks = ivs.site_masks(CONFIG, ["decoder.1.cross_attn.hook_pattern", "decoder.0.cross_attn.hook_pattern"],
                           heads=[2], positions=[1], length=DEC_LEN)
    mask = np.asarray(masks[("decoder", "cross_attn.hook_pattern")])
    assert mask.shape == (2, 1, CONFIG.num_heads, DEC_LEN, 1)
    expected = np.zeros(mask.shape)
    expected[:, 0, 2, 1, 0] = 1
    np.testing.assert_array_equal(mask, expected)


# End to end: a forward with the patch changes exactly the selected slice of the site's activation.
FORWARD_CASES = [  # (site, kind, index): one of each axis layout, self- and cross-attention, both stacks
    ("encoder.1.attn.hook_pattern", "heads", 3),
    ("decoder.1.attn.hook_attn_scores", "heads", 1),
    ("decoder.0.cross_attn.hook_k", "heads", 2),
    ("decoder.1.cross_attn.hook_q", "heads", 1),
    ("decoder.1.cross_attn.hook_pattern", "positions", 1),
    ("decoder.0.cross_attn.hook_v", "positions", ENC_LEN - 2),
    ("encoder.1.attn.hook_z", "positions", 2),
    ("decoder.1.mlp.hook_post", "positions", 1),
    ("decoder.1.mlp.hook_post", "neurons", 7),
]


@pytest.fixture(scope="module")
def clean_cache(model):
    params, batch = model
    _, cache = gj.forward_with_cache(CONFIG, params, *batch, cache_sites=sorted({c[0] for c in FORWARD_CASES}))
    return {name: np.asarray(value) for name, value in cache.items()}


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
@pytest.mark.parametrize("site, kind, index", FORWARD_CASES)
def test_patch_changes_exactly_the_selected_slice(model, clean_cache, site, kind, index):
    params, batch = model
    options = {kind: [index]}
    if kind == "positions":
        options["length"] = _position_length(site)
        axis = POSITION_AXIS.get(site.split(".")[-1], 0)
    else:
        axis = HEAD_AXIS[site.split(".")[-1]] if kind == "heads" else 1
    patched = _site_activation(CONFIG, params, batch, site, ivs.zero_ablation(CONFIG, [site], **options))
    _check_only_selected_zeroed(clean_cache[site], patched, axis, index, site)


def test_gated_pre_linear_neurons(model):
    site = "decoder.0.mlp.hook_pre_linear"
    params = gj.init_params(GATED, 2)
    batch = padded_batch(GATED.vocab_size, [ENC_LEN, 4], seed=2, decoder_steps=DEC_LEN)
    clean = _site_activation(GATED, params, batch, site)
    patched = _site_activation(GATED, params, batch, site, ivs.zero_ablation(GATED, [site], neurons=[5]))
    _check_only_selected_zeroed(clean, patched, 1, 5, site)


@pytest.mark.parametrize("builder", ["mean", "replacement"])
def test_mean_and_replacement_heads_select_the_head_axis(model, clean_cache, builder):
    params, batch = model
    site = "decoder.1.cross_attn.hook_q"  # [T, H, K]
    clean = clean_cache[site]
    value = np.full(clean.shape[1:], 7.0, np.float32)
    if builder == "mean":
        iv = ivs.mean_ablation(CONFIG, {site: value}, heads=[3])
    else:
        iv = ivs.replacement(CONFIG, {site: np.broadcast_to(value, clean.shape)}, heads=[3])
    patched = _site_activation(CONFIG, params, batch, site, iv)
    np.testing.assert_allclose(patched[:, :, 3], 7.0, atol=1e-5)
    np.testing.assert_array_equal(patched[:, :, :3], clean[:, :, :3])


# --------------------------------------------------------------------------------------------------
# combine(): patches of one site apply in the given order
# --------------------------------------------------------------------------------------------------

SITE = "decoder.1.hook_mlp_out"  # [T, D]


def _constant(value, positions):
    return ivs.mean_ablation(CONFIG, {SITE: np.full((DEC_LEN, CONFIG.d_model), value, np.float32)},
                             positions=positions, length=DEC_LEN)


def test_combine_applies_patches_of_one_site_in_order(model):
    params, batch = model
    clean = _site_activation(CONFIG, params, batch, SITE)
    a, b = _constant(1.0, [0, 1]), _constant(2.0, [1, 2])
    ab = _site_activation(CONFIG, params, batch, SITE, ivs.combine(a, b))
    ba = _site_activation(CONFIG, params, batch, SITE, ivs.combine(b, a))

    def per_position(x, expected):  # x [B, T, D]: position t holds expected[t] everywhere
        np.testing.assert_allclose(x, np.broadcast_to(np.asarray(expected, np.float32)[None, :, None], x.shape),
                                   atol=1e-5)

    per_position(ab, [1.0, 2.0, 2.0])  # the later patch wins where both apply (position 1)
    per_position(ba, [1.0, 1.0, 2.0])
    assert np.abs(clean[:, 1] - 1.0).min() > 1e-3 and np.abs(clean[:, 1] - 2.0).min() > 1e-3
    # three patches, nested: the last one wins where all apply
    c = _constant(3.0, [1])
    per_position(_site_activation(CONFIG, params, batch, SITE, ivs.combine(a, ivs.combine(b, c))), [1.0, 3.0, 2.0])
    per_position(_site_activation(CONFIG, params, batch, SITE, ivs.combine(ivs.combine(c, a), b)), [1.0, 2.0, 2.0])


def test_combine_keeps_order_structure_and_other_sites():
    a, b = _constant(1.0, [0]), _constant(2.0, [1])
    other = ivs.zero_ablation(CONFIG, ["encoder.0.hook_attn_out"])
    combined = ivs.combine(a, other, b)
    patches = combined["decoder"]["hook_mlp_out"]
    assert isinstance(patches, tuple) and len(patches) == 2
    assert float(np.asarray(patches[0].value).max()) == 1.0 and float(np.asarray(patches[1].value).max()) == 2.0
    assert set(combined) == {"decoder", "encoder"} and "hook_attn_out" in combined["encoder"]
    # combining a tuple keeps its inner order after what came before
    again = ivs.combine(_constant(5.0, [2]), combined)
    values = [float(np.asarray(p.value).max()) for p in again["decoder"]["hook_mlp_out"]]
    assert values == [5.0, 1.0, 2.0]
    assert ivs.combine() == {} and ivs.combine(None, a)["decoder"]["hook_mlp_out"][0] is a["decoder"]["hook_mlp_out"]
