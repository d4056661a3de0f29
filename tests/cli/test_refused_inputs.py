"""Inputs that used to be accepted silently, or refused naming the wrong problem: each is refused at its root
(the library validator, so library callers get it too), naming the real problem."""

from __future__ import annotations

import json

import pytest

from genir_jax.analysis.circuit import Circuit, CircuitPatch, circuit_configuration, circuit_from_json
from genir_jax.analysis.inputs import encode_queries
from genir_jax.analysis.reading import parse_layers
from genir_jax.analysis.stage_patching import parse_stages
from genir_jax.analysis.stages import fixed_stages
from genir_jax.base.errors import DataError, GenIRError
from genir_jax.base.io import read_json
from genir_jax.cli.main import main
from genir_jax.core.config import T5Config
from genir_jax.data.corpus import read_qrels
from genir_jax.docids.schemes import semantic_scheme
from genir_jax.interp.site_grammar import SiteSpecError, parse_receivers, parse_sweep

CONFIG = T5Config(vocab_size=100, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=3, num_heads=2)


# --------------------------------------------------------------------------------------------------
# Messages that named the wrong problem
# --------------------------------------------------------------------------------------------------

def test_a_reversed_stage_range_is_called_reversed():
    with pytest.raises(GenIRError, match="range '2-0' is reversed") as info:
        parse_stages("2-0", 3)
    assert "outside" not in str(info.value)
    with pytest.raises(GenIRError, match="outside the decoder's layers 0-2"):
        parse_stages("1-3", 3)
    with pytest.raises(GenIRError, match="--layers: range '2-1' is reversed"):
        parse_layers("2-1", 3)


def test_an_empty_file_is_called_empty(tmp_path):
    path = tmp_path / "qrels.json"
    path.write_text("")
    for reader in (read_qrels, read_json):
        with pytest.raises(DataError, match="is empty") as info:
            reader(path)
        assert str(path) in str(info.value) and "invalid JSON" not in str(info.value)
    path.write_text(" \n")
    with pytest.raises(DataError, match="is empty"):
        read_qrels(path)


# --------------------------------------------------------------------------------------------------
# Silent acceptance
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["", "  "])
def test_an_empty_stage_specification_is_refused(spec):
    with pytest.raises(GenIRError, match="empty stage specification"):
        fixed_stages(spec, 3)
    assert fixed_stages(None, 3) is None  # no specification: automatic stages


@pytest.mark.parametrize("data, message", [
    ({"patches": [], "nmae": "x"}, "c.json: unknown field 'nmae'; the fields are name, patches"),
    ({"patches": [{"component": "mlp", "stages": [0], "mode": "zero", "layer": 3}]},
     "c.json: patches[0]: unknown field 'layer'; the fields are component, stages, mode"),
    ({"patches": [{"component": "mlp", "stages": [0, 1], "mode": "zero"},
                  {"component": "mlp", "stages": [1], "mode": "mean"}]},
     "patches[1]: mlp of stage 1 is patched with 'mean' here and with 'zero' by patches[0]"),
    ({"patches": [{"component": "attn", "stages": "all", "mode": "mean"},
                  {"component": "attn", "stages": [2], "mode": "zero"}]},
     "patches[1]: attn of stage 2 is patched with 'zero' here and with 'mean' by patches[0]"),
])
def test_circuit_json_problems_are_refused(data, message):
    with pytest.raises(DataError) as info:
        circuit_from_json(data, "c.json", 3)
    assert message in str(info.value)


def test_circuit_patches_of_other_components_or_one_mode_may_share_a_stage():
    data = {"patches": [{"component": "mlp", "stages": [0], "mode": "zero"},
                        {"component": "attn", "stages": [0], "mode": "mean"},
                        {"component": "mlp", "stages": [0, 1], "mode": "zero"}]}
    assert len(circuit_from_json(data, "c.json", 3).patches) == 3


def test_a_circuit_built_in_code_with_zero_and_mean_on_one_layer_is_refused():
    circuit = Circuit("c", (CircuitPatch("mlp", (0,), "zero"), CircuitPatch("mlp", "all", "mean")))
    with pytest.raises(GenIRError, match=r"mlp of layer\(s\) \[0\] is both zeroed and mean-replaced"):
        circuit_configuration(CONFIG, circuit, [[0], [1], [2]], {})


@pytest.mark.parametrize("specs, message", [
    (["decoder.0.mlp", "decoder.0.mlp"], "layer=0 is listed twice"),
    (["decoder.*.mlp", "decoder.1.mlp"], "site=decoder.1.hook_mlp_out, component=mlp, layer=1 is listed twice"),
    (["decoder.1.cross_attn.hook_z[head=0,1]", "decoder.1.cross_attn.hook_z[head=1]"], "head=1 is listed twice"),
])
def test_duplicated_sites_are_refused(specs, message):
    with pytest.raises(SiteSpecError, match=message.replace(".", r"\.")):
        parse_sweep(CONFIG, specs)
    assert parse_sweep(CONFIG, ["decoder.0.mlp", "decoder.1.mlp"]).size == 2


@pytest.mark.parametrize("spec, message", [("mlp[1]+mlp[0-1]", "mlp layer 1 is listed twice"),
                                           ("logits+mlp[0]+logits", "'logits' is listed twice")])
def test_duplicated_receivers_are_refused(spec, message):
    with pytest.raises(SiteSpecError, match=message):
        parse_receivers(CONFIG, spec)
    assert parse_receivers(CONFIG, "mlp[1]+attn[1]+logits").size == 1


@pytest.mark.parametrize("metric", [["--metric", "rank,rank"], ["--metric", "rank", "--metric", "logit,rank"]])
def test_duplicated_metrics_are_refused(tmp_path, capsys, metric):
    out = tmp_path / "out"
    assert main(["sweep", "-c", str(tmp_path / "none"), "--val-queries", str(tmp_path / "v.json"),
                 "--sites", "decoder.*.mlp", *metric, "-o", str(out)]) == 2
    assert "--metric: 'rank' is listed twice" in capsys.readouterr().err and not out.exists()


def test_semantic_mapping_entries_for_unknown_documents_are_refused():
    mapping = {"d0": "0_0", "d1": "0_1", "zz": "1_0", "yy": "1_1"}
    with pytest.raises(DataError, match="map.json: document 'zz' is not in the corpus"):
        semantic_scheme(mapping, ["d0", "d1"], "map.json")
    assert semantic_scheme({"d0": "0_0", "d1": "0_1"}, ["d0", "d1"], "map.json").docids == {"d0": "0_0", "d1": "0_1"}


def test_evaluate_refuses_a_bad_name_before_reading_anything(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "none"), "--queries", str(tmp_path / "none.json"),
                 "--name", "a/b", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--name must be a plain file-name part" in err and "not found" not in err and not out.exists()


class _WordTokenizer:
    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text):
        class Encoded:
            input_ids = [2 + len(word) for word in text.split()] + [1]
        return Encoded()


def test_the_truncation_warning_prints_once(capsys):
    texts = ["short", " ".join(["twice"] * 600), " ".join(["again"] * 700)]
    encode_queries(_WordTokenizer(), texts)
    encode_queries(_WordTokenizer(), texts)  # the analyses tokenise the same queries again (reference padding)
    err = capsys.readouterr().err
    assert err.count("truncated") == 1 and "2 queries longer than 512 tokens truncated" in err
