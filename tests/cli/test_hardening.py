"""Bad numbers, bad names, bad output paths and leftovers of killed runs: exit 2 with a message naming the
option or path, no traceback, no partial output."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import pytest

from genir_jax.cli.main import main
from genir_jax.base.errors import GenIRError
from tests.conftest import REPO_ROOT


def _squad_data(root):
    data_dir = root / "data"
    (data_dir / "squad-v1.1-dev").mkdir(parents=True)
    contexts = ["Paris is the capital of France.", "Berlin is the capital of Germany.", "Rome is in Italy.",
                "Madrid lies in Spain.", "Vienna is in Austria."]
    squad = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": text, "qas": [{"id": f"p{p}q{i}", "question": f"what about {text.split()[0]} {i}?",
                                   "answers": []} for i in range(6)]} for p, text in enumerate(contexts)]}]}
    (data_dir / "squad-v1.1-dev" / "dev-v1.1.json").write_text(json.dumps(squad), encoding="utf-8")
    return data_dir


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    out = root / "prepared"
    assert main(["prepare-data", "--dataset", "squad-dev", "--data-dir", str(_squad_data(root)), "-o", str(out),
                 "--val-fraction", "0.2", "--test-fraction", "0.2"]) == 0
    return out


def _refused(capsys, argv, *needles, output=None):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in captured.err, captured.err
    if output is not None:
        assert not os.path.exists(output)
    return captured.err


# --------------------------------------------------------------------------------------------------
# Numeric options
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--val-fraction", "nan"), ("--val-fraction", "inf"),
                                           ("--val-fraction", "-0.1"), ("--test-fraction", "nan"),
                                           ("--test-fraction", "-inf"), ("--test-fraction", "1.0")])
def test_prepare_data_refuses_bad_fractions(tmp_path, capsys, option, value):
    out = tmp_path / "out"
    _refused(capsys, ["prepare-data", "--dataset", "squad-dev", "--data-dir", str(_squad_data(tmp_path)),
                      "-o", str(out), f"{option}={value}"], option, output=out)


def test_prepare_data_refuses_fractions_summing_to_one(tmp_path, capsys):
    out = tmp_path / "out"
    _refused(capsys, ["prepare-data", "--dataset", "squad-dev", "--data-dir", str(_squad_data(tmp_path)), "-o",
                      str(out), "--val-fraction", "0.6", "--test-fraction", "0.4"], "--val-fraction + --test-fraction",
             output=out)


def test_split_fractions_that_are_not_numbers_raise_genir_errors():
    from genir_jax.data.splits import allocate

    for bad in (float("nan"), float("inf"), -0.5, 1.0):
        with pytest.raises(GenIRError, match="val_fraction"):
            allocate([10], bad, 0.1)
        with pytest.raises(GenIRError, match="test_fraction"):
            allocate([10], 0.1, bad)


@pytest.mark.parametrize("option, value", [("--k1", "nan"), ("--k1", "-1"), ("--k1", "inf"), ("--b", "nan"),
                                           ("--b", "-0.1"), ("--b", "1.5"), ("--k", "0")])
def test_bm25_refuses_bad_parameters(prepared, tmp_path, capsys, option, value):
    out = tmp_path / "bm25"
    _refused(capsys, ["bm25", "--prepared", str(prepared), "-o", str(out), f"{option}={value}"], option, output=out)


def test_bm25_accepts_trec_qrels_and_writes_strict_json(prepared, tmp_path, capsys):
    """The TREC qrels prepare-data writes give the same metrics as its JSON qrels; metrics.json is strict JSON."""
    def strict(path):
        def refuse(constant):
            raise AssertionError(f"{path}: non-JSON constant {constant}")
        return json.loads(path.read_text(), parse_constant=refuse)

    results = {}
    for name, qrels in (("json", "test_qrels.json"), ("trec", "test.qrels")):
        out = tmp_path / name
        assert main(["bm25", "--prepared", str(prepared), "--qrels", str(prepared / qrels), "-o", str(out)]) == 0
        results[name] = strict(out / "metrics.json")["metrics"]
        assert all(math.isfinite(v) for v in results[name].values())
    capsys.readouterr()
    assert results["json"] == results["trec"]


# --------------------------------------------------------------------------------------------------
# TREC qrels
# --------------------------------------------------------------------------------------------------

def test_read_qrels_reads_the_trec_qrels_prepare_data_writes(prepared):
    from genir_jax.data.corpus import read_qrels

    for split in ("val", "test"):
        assert read_qrels(prepared / f"{split}.qrels") == read_qrels(prepared / f"{split}_qrels.json")


@pytest.mark.parametrize("text, message", [("q1 0 d1\n", "expected 4 fields"), ("q1 0 d1 high\n", "must be an integer"),
                                           ("q1 0 d1 1\nq1 0 d1 2\n", "judged twice"), ("\n\n", "is empty")])
def test_bad_trec_qrels_name_the_line(tmp_path, text, message):
    from genir_jax.data.corpus import read_qrels
    from genir_jax.base.errors import DataError

    path = tmp_path / "bad.qrels"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as info:
        read_qrels(path)
    assert str(path) in str(info.value)


def test_evaluate_accepts_trec_qrels_up_to_the_checkpoint(prepared, tmp_path, capsys):
    """`evaluate --qrels val.qrels` reads the TREC file (it fails only later, at the missing checkpoint)."""
    out = tmp_path / "eval"
    err = _refused(capsys, ["evaluate", "--checkpoint", str(tmp_path / "no-model"), "--queries",
                            str(prepared / "val_queries.json"), "--qrels", str(prepared / "val.qrels"), "-o",
                            str(out)], "no-model", output=out)
    assert "val.qrels" not in err


# --------------------------------------------------------------------------------------------------
# evaluate --name
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a/b", "../up", "", " ", "..", ".", "a\\b", "/abs"])
def test_evaluate_refuses_names_with_path_separators(prepared, tmp_path, capsys, name):
    out = tmp_path / "eval"
    _refused(capsys, ["evaluate", "--checkpoint", str(tmp_path / "no-model"), "--prepared", str(prepared),
                      "-o", str(out), "--name", name], "--name", output=out)


# --------------------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------------------

def _output_cases(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    link = tmp_path / "link-to-file"
    link.symlink_to(target)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    return {"file": target, "link": link, "dangling": dangling, "below-file": target / "sub"}


@pytest.mark.parametrize("case", ["file", "link", "dangling", "below-file"])
@pytest.mark.parametrize("command", ["bm25", "prepare-data", "evaluate"])
def test_output_that_is_not_a_directory_is_refused_before_computing(prepared, tmp_path, capsys, case, command):
    out = _output_cases(tmp_path)[case]
    argv = {"bm25": ["bm25", "--prepared", str(prepared)],
            "prepare-data": ["prepare-data", "--dataset", "squad-dev", "--data-dir", str(tmp_path / "no-data")],
            "evaluate": ["evaluate", "--checkpoint", str(tmp_path / "no-model"), "--prepared", str(prepared)]}[command]
    err = _refused(capsys, argv + ["-o", str(out)], "-o/--output", str(out))
    assert "no-data" not in err and "no-model" not in err  # refused before reading any input
    assert (tmp_path / "a-file").read_text() == "keep me"


def _unwritable_directory(tmp_path):
    """A directory this process may not write in: permission bits for a normal user; root ignores those, so for
    root a filesystem that refuses everyone (sysfs on Linux)."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return locked, "permission denied"
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        return pathlib.Path("/sys"), "cannot write in /sys"
    pytest.fail("running as root and /sys is writable: no unwritable directory to test with")


def test_output_in_a_read_only_directory_is_refused(prepared, tmp_path, capsys):
    locked, message = _unwritable_directory(tmp_path)
    try:
        _refused(capsys, ["bm25", "--prepared", str(prepared), "-o", str(locked / "out")], "-o/--output",
                 message, output=locked / "out")
    finally:
        if locked != pathlib.Path("/sys"):
            locked.chmod(0o755)


def test_check_output_dir_accepts_new_and_existing_directories(tmp_path):
    from genir_jax.base.io import check_output_dir

    assert check_output_dir(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link-to-dir").symlink_to(tmp_path / "dir")
    check_output_dir(str(tmp_path / "dir"))
    check_output_dir(str(tmp_path / "link-to-dir"))
    with pytest.raises(GenIRError, match="not a valid path"):
        check_output_dir("")


def test_oserror_while_writing_exits_2_naming_the_path(prepared, tmp_path, capsys, monkeypatch):
    import genir_jax.base.io

    def failing(path):
        raise PermissionError(13, "Permission denied", str(tmp_path / "somewhere"))

    monkeypatch.setattr(genir_jax.base.io, "atomic_directory", failing)
    err = _refused(capsys, ["bm25", "--prepared", str(prepared), "-o", str(tmp_path / "out")],
                   f"genir-jax bm25: error: {tmp_path / 'somewhere'}: Permission denied", output=tmp_path / "out")
    assert err.count("\n") == 1


def test_write_json_refuses_nan_when_asked(tmp_path):
    from genir_jax.base.io import write_json

    with pytest.raises(GenIRError, match="non-finite"):
        write_json(tmp_path / "metrics.json", {"MRR@10": float("nan")}, allow_nan=False)
    assert not (tmp_path / "metrics.json").exists() and not os.listdir(tmp_path)
    write_json(tmp_path / "metrics.json", {"MRR@10": 0.5}, allow_nan=False)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"MRR@10": 0.5}


# --------------------------------------------------------------------------------------------------
# train / pretrain --resume with nothing to resume
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "pretrain"])
@pytest.mark.parametrize("state", ["missing", "empty", "no-checkpoint"])
def test_resume_with_nothing_to_resume_is_refused(tmp_path, capsys, command, state):
    out = tmp_path / "run"
    if state != "missing":
        out.mkdir()
    if state == "no-checkpoint":
        (out / "metrics.jsonl").write_text("")
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "10.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save is not a checkpoint
    argv = [command, "--data", str(tmp_path / "no-data"), "--preset", "tiny", "-o", str(out), "--resume"]
    if command == "train":
        argv += ["--base", str(tmp_path / "no-base")]
    err = _refused(capsys, argv, "--resume", "no checkpoint")
    assert "no-data" not in err
    assert os.path.exists(out) == (state != "missing")


def test_has_checkpoint_and_resume_mode(tmp_path):
    import argparse

    from genir_jax.training.options import has_checkpoint, resume_mode

    assert not has_checkpoint(str(tmp_path / "missing"))
    (tmp_path / "checkpoints" / "tmp").mkdir(parents=True)
    assert not has_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints" / "20").mkdir()
    assert has_checkpoint(str(tmp_path))
    assert resume_mode(argparse.Namespace(resume=True, resume_if_any=False)) == (True, True)
    assert resume_mode(argparse.Namespace(resume=False, resume_if_any=True)) == (True, False)
    assert resume_mode(argparse.Namespace(resume=False, resume_if_any=False)) == (False, False)


# --------------------------------------------------------------------------------------------------
# Staging directories left by killed runs
# --------------------------------------------------------------------------------------------------

def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_staging_directories_are_removed_on_the_next_write(tmp_path):
    from genir_jax.base.io import STALE_STAGING_SECONDS, atomic_directory

    dead = _dead_pid()
    dead_dir = tmp_path / f".out.{dead}.abc123_x.tmp"
    alive_dir = tmp_path / ".out.1.zzz999.tmp"                # pid 1 runs: its staging is in use
    legacy_recent = tmp_path / ".out.k2j4h5g6.tmp"             # no pid: kept until old
    legacy_old = tmp_path / ".out.q1w2e3r4.tmp"
    other_output = tmp_path / f".out.v2.{dead}.abc.tmp"        # staging of output "out.v2", not ours
    other_name = tmp_path / f".outer.{dead}.abc.tmp"
    for directory in (dead_dir, alive_dir, legacy_recent, legacy_old, other_output, other_name):
        directory.mkdir()
        (directory / "partial.json").write_text("{")
    old = time.time() - STALE_STAGING_SECONDS - 60
    os.utime(legacy_old, (old, old))
    with atomic_directory(tmp_path / "out") as staging:
        assert os.path.basename(staging).startswith(f".out.{os.getpid()}.")
        with open(os.path.join(staging, "done.txt"), "w") as handle:
            handle.write("ok")
    assert not dead_dir.exists() and not legacy_old.exists()
    assert alive_dir.exists() and legacy_recent.exists() and other_output.exists() and other_name.exists()
    assert (tmp_path / "out" / "done.txt").read_text() == "ok"


def test_sigkilled_writer_leaves_staging_that_the_next_run_removes(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from genir_jax.base.io import atomic_directory\n"
            "with atomic_directory(sys.argv[1]) as staging:\n"
            "    open(staging + '/half.json', 'w').write('{'); print(staging, flush=True); time.sleep(60)\n")
    root = str(REPO_ROOT)
    process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out"), root], stdout=subprocess.PIPE,
                               text=True)
    staging = process.stdout.readline().strip()
    assert os.path.isdir(staging)
    process.kill()
    process.wait()
    assert os.path.isdir(staging)  # SIGKILL: no cleanup ran

    from genir_jax.base.io import atomic_directory

    with atomic_directory(tmp_path / "out"):
        pass
    assert not os.path.exists(staging)
    assert [name for name in os.listdir(tmp_path) if name.startswith(".out.")] == []
