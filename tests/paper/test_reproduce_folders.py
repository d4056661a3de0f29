"""`reproduce` output folders: the default names every setting that changes the run, a folder made with other
settings is refused naming the differences (also by --list-steps), and a run that did nothing leaves no binding."""

from __future__ import annotations

import json

from genir_jax.cli.main import main
from genir_jax.paper.reproduce import Layout, Settings, check_same_settings, default_out


def test_default_folder_names_scheme_and_regime():
    assert default_out(Settings(dataset="squad-dev", preset="tiny")) == "runs/squad-dev-tiny"
    assert default_out(Settings(dataset="squad-dev", preset="tiny", docids="naive")) == "runs/squad-dev-tiny-naive"
    assert default_out(Settings(dataset="nq-oracle", preset="cpu", docids="semantic", paper_regime=True)) == \
        "runs/nq-oracle-cpu-semantic-paper-regime"


def _bind(directory, **settings):
    layout = Layout(directory)
    layout.steps.mkdir(parents=True)
    (layout.steps / "settings.json").write_text(json.dumps(Settings(**settings).record))
    (layout.steps / "prepare.json").write_text(json.dumps({"seconds": 1.0}))
    return layout


def test_other_settings_are_refused_by_name(tmp_path, capsys):
    layout = _bind(tmp_path / "run", dataset="squad-dev", preset="tiny")
    check_same_settings(layout, Settings(dataset="squad-dev", preset="tiny"))  # the same run: fine
    assert main(["reproduce", "--out", str(tmp_path / "run"), "--docids", "naive", "--list-steps"]) == 2
    err = capsys.readouterr().err
    assert "docids: 'atomic' there, 'naive' here" in err and "{" not in err  # names, not raw dicts
    assert main(["reproduce", "--out", str(tmp_path / "run"), "--list-steps"]) == 0
    assert "prepare" in capsys.readouterr().out


def test_missing_data_names_what_reproduce_takes_and_leaves_nothing_bound(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reproduce", "--out", str(out), "--data-dir", str(tmp_path / "empty"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "file not found" in err and "genir-jax prepare-data --download" in err and "--data-dir" in err
    assert "pass --download" not in err
    assert not (out / ".steps" / "settings.json").exists()


def test_naive_runs_record_the_order_of_their_ids(tmp_path, capsys):
    """A naive run binds its folder to the order of its ids; a naive folder from before the order was recorded
    holds corpus-order ids, so the shuffled default refuses it instead of mixing the two."""
    assert Settings(dataset="squad-dev", preset="tiny", docids="naive").record["naive_order"] == "shuffled"
    assert "naive_order" not in Settings(dataset="squad-dev", preset="tiny").record
    layout = _bind(tmp_path / "run", dataset="squad-dev", preset="tiny", docids="naive")
    check_same_settings(layout, Settings(dataset="squad-dev", preset="tiny", docids="naive"))
    old = Settings(dataset="squad-dev", preset="tiny", docids="naive").record
    del old["naive_order"]
    (layout.steps / "settings.json").write_text(json.dumps(old))
    assert main(["reproduce", "--preset", "tiny", "--out", str(tmp_path / "run"), "--docids", "naive",
                 "--list-steps"]) == 2
    assert "naive_order: 'corpus' there, 'shuffled' here" in capsys.readouterr().err
    assert main(["reproduce", "--preset", "tiny", "--out", str(tmp_path / "run"), "--docids", "naive",
                 "--naive-order", "corpus", "--list-steps"]) == 0
