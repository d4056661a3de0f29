"""Property-based fuzzing (hypothesis) of the CLI's file inputs and option values.

Asserted for every generated input: the command exits 0 or 2 (argparse's usage errors are exit 2 too), no
exception escapes (`genir_jax.cli.main.main` is called in-process; a traceback would be an uncaught exception),
nothing is half-written (on exit 2 the output directory does not exist and no staging directory is left; on
exit 0 the command's files are all there) and memory stays bounded (peak RSS grows by less than 1 GiB over
the whole run). The readers behind the files are fuzzed directly too: they return or raise `GenIRError`.

Bounded for the default suite (a few dozen examples, well under a minute); GENIR_FUZZ=deep runs 20x more.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import resource
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import genir_jax as gj
from genir_jax.analysis.circuit import circuit_from_json
from genir_jax.analysis.cross_attention_writes import parse_heads
from genir_jax.analysis.encoder_swap import normalize_missing
from genir_jax.analysis.inputs import read_correct_valid
from genir_jax.analysis.reading import parse_layers, parse_topk
from genir_jax.analysis.stage_patching import parse_stages
from genir_jax.cli.main import main
from genir_jax.core.config import T5Config
from genir_jax.data.corpus import read_qrels, read_queries
from genir_jax.base.errors import GenIRError

DEEP = os.environ.get("GENIR_FUZZ", "") == "deep"
READERS = settings(max_examples=400 if DEEP else 40, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow])
CLI = settings(max_examples=200 if DEEP else 10, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PAIRS = settings(CLI, max_examples=50 if DEEP else 4)  # each example runs a whole analysis

DOCS = ["d1", "d2", "d3"]
QUERIES = ["who wrote the harry potter books", "what is the capital of france", "when did the war end"]
DIMS = dict(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=3, num_heads=2)
MEMORY_BOUND_KIB = 1024 * 1024

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 200), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.sampled_from(["@DOC_ID_d1@", "@DOC_ID_zz@", "d1", "100", " 101 ", ""]))
json_values = st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=4),
                                                               st.dictionaries(st.text(max_size=8), children,
                                                                               max_size=4)), max_leaves=12)
ids = st.one_of(st.sampled_from([100, 101, 102, "100", "102", 999, "x y", "", True, None, 1.5]), scalars)
query_records = st.lists(st.fixed_dictionaries(
    {"id": ids}, optional={"query": st.one_of(st.sampled_from(QUERIES), scalars),
                           "relevant_docs": st.one_of(st.lists(st.sampled_from(DOCS + ["", 7]), max_size=3),
                                                      scalars)}), max_size=4)
correct_pairs = st.lists(st.one_of(
    st.tuples(st.sampled_from(["@DOC_ID_d1@", "@DOC_ID_d2@", "@DOC_ID_zz@", "d1", "@DOC_ID_@"]), ids).map(list),
    json_values), max_size=4)
qrels_json = st.fixed_dictionaries({}, optional={
    "query": st.lists(ids, max_size=3), "docid": st.lists(st.one_of(st.sampled_from(DOCS), scalars), max_size=3),
    "rel": st.lists(st.one_of(st.integers(-1, 4), scalars), max_size=3), "q0": st.lists(scalars, max_size=3)})
trec_lines = st.lists(st.tuples(st.sampled_from(["100", "101", "x"]), st.sampled_from(["0", "Q0", ""]),
                                st.sampled_from(DOCS + ["", "d 1"]), st.sampled_from(["1", "0", "-1", "x", "1.5"]))
                      .map(" ".join), max_size=4).map("\n".join)
circuits = st.one_of(json_values, st.fixed_dictionaries({"patches": st.lists(st.fixed_dictionaries({}, optional={
    "component": st.sampled_from(["attn", "cross_attn", "mlp", "MLP", ""]),
    "stages": st.one_of(st.just("all"), st.lists(st.one_of(st.integers(-1, 4), st.booleans(), st.floats(0, 3)),
                                                 max_size=3), scalars),
    "mode": st.sampled_from(["zero", "mean", "t5", ""])}), max_size=3)}, optional={"name": scalars}))
option_text = st.one_of(st.text(max_size=10), st.sampled_from(
    ["0-1,2", "0-0,1-1,2-2", "1-0", "0-9", "thirds", "auto", "paper", "0--1", ",", "0-1,1-2", "all", "2.1,0.0",
     "1.1", "3.0", "-1", "0", "5", "nan"]))


def _write(path, value) -> None:
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def _only_genir_errors(function, *args):
    try:
        function(*args)
    except GenIRError:
        pass


# --------------------------------------------------------------------------------------------------
# The readers and option parsers: a result or a GenIRError, never anything else
# --------------------------------------------------------------------------------------------------

@READERS
@given(queries=st.one_of(query_records, json_values), pairs=st.one_of(correct_pairs, json_values),
       qrels=st.one_of(qrels_json, trec_lines, json_values), circuit=circuits)
def test_file_readers_return_or_raise_genir_errors(queries, pairs, qrels, circuit):
    with tempfile.TemporaryDirectory() as directory:
        root = pathlib.Path(directory)
        for name, value, reader in (("q.json", queries, read_queries), ("c.json", pairs, read_correct_valid),
                                    ("qrels", qrels, read_qrels)):
            _write(root / name, value)
            _only_genir_errors(reader, root / name)
    _only_genir_errors(circuit_from_json, circuit, "circuit.json", 3)


@READERS
@given(text=option_text, topk=st.lists(option_text, min_size=1, max_size=3),
       missing=st.one_of(st.text(max_size=20), st.lists(scalars, max_size=3)))
def test_option_parsers_return_or_raise_genir_errors(text, topk, missing):
    config = T5Config(vocab_size=100, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=3, num_heads=2)
    for function, args in ((parse_stages, (text, 3)), (parse_layers, (text, 3)), (parse_heads, (text, config)),
                           (parse_topk, (topk,)), (normalize_missing, (missing,))):
        _only_genir_errors(function, *args)


# --------------------------------------------------------------------------------------------------
# The CLI end to end
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, t5_tokenizer):
    from tests.hf_fixtures import HFCheckpointFactory

    from tests.dsi_fixtures import answering_model

    root = tmp_path_factory.mktemp("fuzz")
    directory, _ = HFCheckpointFactory(root)("base", tokenizer=t5_tokenizer, **DIMS)
    model = gj.add_docid_tokens(gj.load_pretrained(directory), DOCS)
    gj.save_pretrained(root / "dsi", answering_model(model, QUERIES, DOCS))  # its correct.json pairs are correct
    _write(root / "val.json", [{"id": 100 + i, "query": q, "relevant_docs": [DOCS[i]]} for i, q in enumerate(QUERIES)])
    _write(root / "correct.json", [["@DOC_ID_d1@", 100], ["@DOC_ID_d3@", 102]])
    return root


def _run_cli(argv, output, expected_files, errors=None):
    """Run main in-process; assert exit 0/2, no escaping exception, all-or-nothing output. `errors`: a list
    that receives the command's stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage errors
            code = exc.code
    assert code in (0, 2), (code, stderr.getvalue()[-2000:])
    assert "Traceback" not in stderr.getvalue()
    if errors is not None:
        errors.append(stderr.getvalue())
    leftovers = [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert not leftovers, leftovers
    if code == 0:
        assert expected_files <= set(os.listdir(output)), (expected_files, os.listdir(output))
    else:
        assert not output.exists(), os.listdir(output)
    if output.exists():
        shutil.rmtree(output)
    return code


@CLI
@example(queries=[{"id": "t1", "query": QUERIES[1], "relevant_docs": ["d2"]}], pairs=[["@DOC_ID_d1@", 100]],
         circuit={"patches": [{"component": "mlp", "stages": [0, 2], "mode": "mean"}]}, stages="thirds", batch="2",
         k="5", qrels="t1 0 d2 1")  # valid: exit 0 with every file
@given(queries=st.one_of(query_records, json_values), pairs=st.one_of(correct_pairs, json_values),
       circuit=circuits, stages=option_text, batch=st.sampled_from(["1", "0", "-3", "x", "2"]),
       k=st.sampled_from(["1", "0", "5", "-1", "x"]), qrels=st.one_of(qrels_json, trec_lines))
def test_circuit_command_on_fuzzed_files_and_options(checkpoint, tmp_path, queries, pairs, circuit, stages, batch, k,
                                                     qrels):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _write(tmp_path / "test.json", queries)
    _write(tmp_path / "correct.json", pairs)
    _write(tmp_path / "circuit.json", circuit)
    _write(tmp_path / "qrels", qrels)
    output = tmp_path / "out"
    argv = ["--no-compile-cache", "circuit", "-c", str(checkpoint / "dsi"), "--test-queries",
            str(tmp_path / "test.json"),
            "--val-queries", str(checkpoint / "val.json"), "--correct-valid", str(tmp_path / "correct.json"),
            "--circuit", str(tmp_path / "circuit.json"), "--stages", stages, "--batch-size", batch, "--k", k,
            "-o", str(output), "--no-progress"]
    if len(qrels) % 2:
        argv += ["--qrels", str(tmp_path / "qrels")]
    code = _run_cli(argv, output, {"minimal_circuit.json", "stages.json"})
    if queries == [{"id": "t1", "query": QUERIES[1], "relevant_docs": ["d2"]}] and stages == "thirds" and k == "5":
        assert code == 0  # the explicit example above
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start < MEMORY_BOUND_KIB


@CLI
@example(pairs=[["@DOC_ID_d1@", 100], ["@DOC_ID_d3@", "102"]], missing={"other": "d1, d3"}, reference=True)
@given(pairs=st.one_of(correct_pairs, json_values), missing=st.one_of(json_values, st.dictionaries(
       st.sampled_from(["other", "nowhere", ""]), st.one_of(st.text(max_size=12), st.lists(scalars, max_size=3),
                                                            st.sampled_from(["d1", "d1, d3", "@DOC_ID_d2@"])),
       max_size=2)), reference=st.booleans())
def test_swap_encoder_on_fuzzed_files(checkpoint, tmp_path, pairs, missing, reference):
    _write(tmp_path / "correct.json", pairs)
    if isinstance(missing, dict):
        missing = {(str(checkpoint / "dsi") if k == "other" else k): v for k, v in missing.items()}
    _write(tmp_path / "missing.json", missing)
    output = tmp_path / "out"
    argv = ["--no-compile-cache", "swap-encoder", "--complete-model-path", str(checkpoint / "dsi"),
            "--missing-docs-for-model",
            str(tmp_path / "missing.json"), "--val-queries", str(checkpoint / "val.json"), "--correct-valid",
            str(tmp_path / "correct.json"), "-o", str(output), "--no-progress"]
    _run_cli(argv + (["--reference"] if reference else []), output, {"swapped_encoder.json"})


@PAIRS
@example(pairs=[("d1", 100), ("d3", 102)], allow=False, command="sweep")  # correct: exit 0
@example(pairs=[("d1", 100), ("d1", 102)], allow=False, command="patch-stages")  # not relevant: refused
@example(pairs=[("d2", 100), ("d2", 101)], allow=True, command="attribute")  # kept, with a warning
@given(pairs=st.lists(st.tuples(st.sampled_from(DOCS), st.sampled_from([100, 101, 102])), min_size=1, max_size=4,
                      unique=True), allow=st.booleans(),
       command=st.sampled_from(["sweep", "attribute", "patch-stages"]))
def test_incorrect_pairs_are_refused_unless_allowed(checkpoint, tmp_path, pairs, allow, command):
    """The model ranks query 100 + i's relevant document DOCS[i] first (`answering_model`), so a pair is correct
    iff it is [DOCS[i], 100 + i]: any other pair is refused in one line naming the first one and the count, or
    with --allow-incorrect kept with a warning counting them."""
    _write(tmp_path / "correct.json", [[gj.docid_token(doc), query] for doc, query in pairs])
    output = tmp_path / "out"
    options = ["--modes", "zero", "--stages", "thirds"] if command == "patch-stages" else ["--sites", "decoder.*.mlp"]
    argv = ["--no-compile-cache", command, "-c", str(checkpoint / "dsi"), "--val-queries", str(checkpoint / "val.json"),
            "--correct-valid", str(tmp_path / "correct.json"), "-o", str(output), "--no-progress", *options]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv + (["--allow-incorrect"] if allow else []))
    wrong = [index for index, (doc, query) in enumerate(pairs) if DOCS.index(doc) != query - 100]
    err = stderr.getvalue()
    if wrong and not allow:
        doc, query = pairs[wrong[0]]
        assert code == 2 and len(err.strip().splitlines()) == 1 and not output.exists(), err
        assert f"correct.json: record index {wrong[0]}: field 0 (docid_token) '@DOC_ID_{doc}@' is not a relevant " \
            f"document of query '{query}' ({len(wrong)} of {len(pairs)} pairs are not correct" in err, err
        assert "--allow-incorrect accepts them" in err
    else:
        assert code == 0, err
        assert (f"{len(wrong)} of {len(pairs)} pairs are not correct" in err) == bool(wrong), err
        shutil.rmtree(output)


# --------------------------------------------------------------------------------------------------
# Corrupt checkpoints: a non-finite weight is refused (exit 2, one line naming the tensor), never run
# --------------------------------------------------------------------------------------------------

NONFINITE_TENSORS = ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
                     "decoder.block.2.layer.1.EncDecAttention.o.weight", "decoder.block.1.layer.2.DenseReluDense.wo.weight",
                     "decoder.final_layer_norm.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]


@CLI
@example(command="evaluate", tensor="decoder.final_layer_norm.weight", value=float("nan"), index=0)
@example(command="sweep", tensor="shared.weight", value=float("nan"), index=7)
@example(command="attribute", tensor="decoder.block.1.layer.2.DenseReluDense.wo.weight", value=float("inf"), index=3)
@given(command=st.sampled_from(["evaluate", "sweep", "attribute"]), tensor=st.sampled_from(NONFINITE_TENSORS),
       value=st.sampled_from([float("nan"), float("inf"), float("-inf")]), index=st.integers(0, 10_000))
def test_commands_refuse_a_checkpoint_with_a_non_finite_weight(checkpoint, tmp_path, command, tensor, value, index):
    from tests.hf_fixtures import poison_safetensors

    corrupt = tmp_path / "corrupt"
    if corrupt.exists():
        shutil.rmtree(corrupt)
    shutil.copytree(checkpoint / "dsi", corrupt)
    poison_safetensors(corrupt, tensor, value, index)
    output = tmp_path / "out"
    if command == "evaluate":
        argv = ["evaluate", "--checkpoint", str(corrupt), "--queries", str(checkpoint / "val.json"), "--k", "2"]
    else:
        argv = [command, "--checkpoint", str(corrupt), "--val-queries", str(checkpoint / "val.json"),
                "--correct-valid", str(checkpoint / "correct.json"), "--sites", "decoder.*.mlp", "--no-progress"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["--no-compile-cache"] + argv + ["-o", str(output)])
    lines = stderr.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, stderr.getvalue()[-2000:])
    assert f"tensor '{tensor}' holds 1 non-finite value(s)" in lines[0] and str(corrupt) in lines[0]
    assert not output.exists()


@pytest.mark.parametrize("command", ["circuit", "swap-encoder", "patch-stages"])
def test_concurrent_writers_into_one_folder_are_refused(checkpoint, tmp_path, command):
    """The concurrent-writers class: while another run holds an output folder (here a process holding its
    run lock, as a running command does), every command into it exits 2 with one line and writes nothing."""
    from tests.base.test_runs import hold_lock

    output = tmp_path / "out"
    inputs = {
        "circuit": ["-c", str(checkpoint / "dsi"), "--test-queries", str(checkpoint / "val.json"),
                    "--circuit", str(tmp_path / "circuit.json")],
        "swap-encoder": ["--complete-model-path", str(checkpoint / "dsi"), "--missing-docs-for-model",
                         str(tmp_path / "missing.json")],
        "patch-stages": ["-c", str(checkpoint / "dsi"), "--allow-incorrect"],
    }[command]
    _write(tmp_path / "circuit.json", {"patches": [{"component": "mlp", "stages": [0, 2], "mode": "mean"}]})
    _write(tmp_path / "missing.json", {str(checkpoint / "dsi"): "d1"})
    argv = ["--no-compile-cache", command, *inputs, "--val-queries", str(checkpoint / "val.json"), "--correct-valid",
            str(checkpoint / "correct.json"), "-o", str(output), "--no-progress"]
    holder, errors = hold_lock(output), []
    try:
        assert _run_cli(argv, output, set(), errors) == 2
    finally:
        holder.kill()
        holder.wait()
    assert errors[0].strip() == (f"genir-jax {command}: error: -o/--output {output}: another genir-jax run (process "
                                 f"{holder.pid}) is writing into this folder; wait for it to finish or choose another "
                                 "folder")
    assert _run_cli(argv, output, set()) == 0  # the holder gone (killed: no stale lock), the same run goes through
