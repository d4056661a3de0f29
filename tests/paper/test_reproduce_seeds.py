"""`reproduce --seeds N`: one folder per DSI training seed on shared data and base, resume per seed, the seed
count in the settings check and --list-steps, and the pooled report (per-seed cells as each seed's report
writes them, pooled cells bootstrapped over (seed, query) pairs)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from genir_jax.analysis.evidence import bootstrap, share
from genir_jax.base.errors import GenIRError
from genir_jax.cli.main import main
from genir_jax.paper import reproduce as rp
from genir_jax.paper import seeds as pooled
from genir_jax.paper.experiments import claims
from tests.paper.test_report_panels import _table


def _scipy_cell(observations, unit: float, n: str) -> str:
    """The pooled cell computed independently: scipy's percentile bootstrap on the concatenated observations."""
    from scipy.stats import bootstrap as scipy_bootstrap

    values = np.sort(np.concatenate(observations).astype(np.float64))
    low, high = scipy_bootstrap((values,), np.mean, n_resamples=10_000, confidence_level=0.95, method="percentile",
                                vectorized=True, rng=np.random.default_rng(0)).confidence_interval
    return f"{unit * values.mean():.2f} [{unit * low:.2f}, {unit * high:.2f}] (n={n})"


def test_a_statistic_pooled_over_seeds_bootstraps_seed_query_pairs():
    rng = np.random.default_rng(1)
    values = {3: rng.random(50), 4: rng.random(50) + 0.2}
    statistic = pooled.SeedStatistic("a mean", {seed: bootstrap(v) for seed, v in values.items()}, unit=1)
    cells = statistic.cells()
    assert cells[:2] == [bootstrap(values[3]).format(2), bootstrap(values[4]).format(2)]  # as each seed's report
    assert cells[2] == _scipy_cell(list(values.values()), 1, "2x50")
    record = statistic.record()
    assert record["pooled"]["queries"] == 100 and record["pooled"]["n"] == "2x50"
    assert record["per_seed"]["3"] == bootstrap(values[3]).record()
    uneven = pooled.SeedStatistic("x", {0: share([True, False] * 10), 1: share([True] * 30)})
    assert uneven.cells()[2].endswith("(n=20+30)")
    missing = pooled.SeedStatistic("x", {0: share([True, False]), 1: None})
    assert missing.pooled is None and missing.cells()[1:] == ["not available", "not available"]


def _stage_ranks(layout, ranks: dict) -> None:
    directory = layout.analysis("patch-stages")
    directory.mkdir(parents=True)
    (directory / "ranks_correct_queries_patching_single_combis.json").write_text(json.dumps(ranks))


def test_pooled_report_gives_each_claim_per_seed_pooled_and_whether_the_seeds_agree(tmp_path):
    root = rp.Layout(tmp_path)
    layouts = {0: root.seed_layout(0), 1: root.seed_layout(1)}
    ranks = {0: {"0-attn-zero": [0] * 60, "0-mlp-zero": [3] * 55 + [0] * 5},
             1: {"0-attn-zero": [0] * 58 + [2] * 2, "0-mlp-zero": [0] * 60}}
    for seed, layout in layouts.items():
        _stage_ranks(layout, ranks[seed])
    settings = rp.Settings(dataset="squad-dev", preset="tiny", seeds=2)
    pooled.write_pooled_report(root, settings, layouts)
    report = (tmp_path / "report.md").read_text()
    headers, rows = _table(report, "the paper's claim (NQ10k, T5-large)")
    assert headers[2:5] == ["seed 0 [95% CI] (n)", "seed 1 [95% CI] (n)", "pooled [95% CI] (n=seeds x queries)"]
    rows = {row[0]: row for row in rows}
    own = {seed: {row[0]: row for row in _table(claims.render(layout).markdown,
                                                  "the paper's claim (NQ10k, T5-large)")[1]}
           for seed, layout in layouts.items()}
    attention, mlp = "Decoder self-attention is dispensable (stage I)", "Stage-I MLPs prime the decoder (needed)"
    for text, key in ((attention, "0-attn-zero"), (mlp, "0-mlp-zero")):
        assert rows[text][2:4] == [own[0][text][2], own[1][text][2]]  # each seed's cell as its report writes it
        flags = [np.asarray(ranks[seed][key]) != 0 for seed in (0, 1)]
        assert rows[text][4] == _scipy_cell(flags, 100, "2x60")
    assert f"- {attention}: the seeds agree (seed 0: holds; seed 1: holds)" in report
    assert own[0][mlp][4] == "holds" and own[1][mlp][4] == "does not hold"
    assert f"- {mlp}: the seeds DISAGREE (seed 0: holds; seed 1: does not hold)" in report
    assert rows[mlp][6] == "does not hold"  # pooled 45.8% [...]: the paper's 92.86% is outside, below 50
    assert rows["The minimal circuit keeps the model's effectiveness"][4] == "not available"
    assert "- The minimal circuit keeps the model's effectiveness: not available in any seed" in report
    _, retrieval = _table(report, "statistic")
    assert retrieval[0][1:] == ["not available"] * 3  # no evaluation in these folders
    record = json.loads((tmp_path / pooled.REPORT_JSON).read_text())
    assert record["seeds"] == [0, 1]
    claim = next(c for c in record["claims"] if c["claim"] == mlp)
    assert claim["seeds_agree"] is False and claim["pooled"]["queries"] == 120
    assert claim["per_seed"]["1"]["verdict"] == "does not hold"
    assert next(c for c in record["claims"] if c["claim"] == attention)["seeds_agree"] is True


def _fake_steps(monkeypatch, calls, fail=()):
    """A small pipeline of recorders: (step, folder, training seed) per call; `fail`: (step, seed) that raise
    once, as a killed run."""
    failing = set(fail)

    def make(name, action=None):
        def run(layout, settings):
            if (name, settings.seed) in failing:
                failing.discard((name, settings.seed))
                raise RuntimeError("killed")
            calls.append((name, layout.root.name, settings.seed))
            if action:
                action(layout)
        return run

    def evaluate(layout):
        layout.eval_val.mkdir(parents=True, exist_ok=True)
        layout.correct_valid.write_text(json.dumps([["@DOC_ID_1@", "q1"]]))

    fake = [rp.Step("prepare", make("prepare")), rp.Step("pretrain", make("pretrain")),
            rp.Step("train-full", make("train-full")), rp.Step("evaluate-full", make("evaluate-full", evaluate)),
            rp.Step("patch-stages", make("patch-stages"), analysis=True),
            rp.Step("report", make("report"), always=True)]
    monkeypatch.setattr(rp, "steps", lambda settings: fake)


def test_each_seed_runs_in_its_folder_on_shared_data_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    calls: list[tuple] = []
    _fake_steps(monkeypatch, calls, fail=[("evaluate-full", 8)])
    settings = rp.Settings(dataset="squad-dev", preset="tiny", seeds=2, seed=7)
    with pytest.raises(RuntimeError, match="killed"):
        rp.reproduce(tmp_path, settings, log=lambda *_: None)
    assert calls == [("prepare", tmp_path.name, 7), ("pretrain", tmp_path.name, 7),  # neither uses the seed
                     ("train-full", "seed-7", 7), ("evaluate-full", "seed-7", 7), ("patch-stages", "seed-7", 7),
                     ("report", "seed-7", 7), ("train-full", "seed-8", 8)]
    assert sorted(p.name for p in (tmp_path / ".steps").iterdir()) == ["prepare.json", "pretrain.json",
                                                                        "settings.json"]
    seeded = rp.Layout(tmp_path).seed_layout(7)
    assert seeded.data == tmp_path / "data" and seeded.base == tmp_path / "models" / "base"
    assert seeded.full == tmp_path / "seed-7" / "models" / "full"
    assert json.loads((seeded.steps / "settings.json").read_text())["seed"] == 7
    calls.clear()
    lines: list[str] = []
    rp.reproduce(tmp_path, settings, log=lines.append)  # resumes at seed 8's first unfinished step
    assert calls == [("report", "seed-7", 7), ("evaluate-full", "seed-8", 8), ("patch-stages", "seed-8", 8),
                     ("report", "seed-8", 8)]
    assert any(re.fullmatch(r"seed-7 \[1/4\] train-full: done \(\d+ s\), skipped", line) for line in lines)
    assert (tmp_path / "report.md").read_text().startswith("# genir-jax reproduction over 2 seeds")
    assert (tmp_path / pooled.REPORT_JSON).is_file() and (tmp_path / "seed-8" / ".steps" / "report.json").is_file()
    from genir_jax.paper.report import write_report

    empty = rp.Layout(tmp_path / "empty").seed_layout(7)  # a seed's report says which seed it is
    write_report(empty, rp.Settings(dataset="squad-dev", preset="tiny", seeds=2, seed=7), rp.seed_steps(settings))
    assert "Training seed 7, one of 2" in empty.report.read_text()
    calls.clear()
    rp.reproduce(tmp_path, settings, force=("patch-stages",), log=lambda *_: None)
    assert [call for call in calls if call[0] == "patch-stages"] == [("patch-stages", "seed-7", 7),
                                                                     ("patch-stages", "seed-8", 8)]
    for other, difference in ((dict(seeds=3), "seeds: 2 there, 3 here"), (dict(seeds=1), "seeds: 2 there, 1 here"),
                              (dict(seeds=2), "seed: 7 there, None here")):
        with pytest.raises(GenIRError, match=difference):
            rp.reproduce(tmp_path, rp.Settings(dataset="squad-dev", preset="tiny", **other), log=lambda *_: None)


def test_one_seed_is_the_run_as_before(tmp_path, monkeypatch):
    """--seeds 1 (the default): no seed folder, no seed in settings.json, the preset's seed in training."""
    calls: list[tuple] = []
    _fake_steps(monkeypatch, calls)
    rp.reproduce(tmp_path, rp.Settings(dataset="squad-dev", preset="tiny"), log=lambda *_: None)
    assert {folder for _, folder, _ in calls} == {tmp_path.name} and {seed for *_, seed in calls} == {None}
    record = json.loads((tmp_path / ".steps" / "settings.json").read_text())
    assert "seeds" not in record and "seed" not in record and not list(tmp_path.glob("seed-*"))
    with pytest.raises(GenIRError, match="seeds: 1 there, 2 here"):
        rp.reproduce(tmp_path, rp.Settings(dataset="squad-dev", preset="tiny", seeds=2), log=lambda *_: None)
    assert rp.training_seeds(rp.Settings(dataset="squad-dev", preset="tiny", seeds=3)) == [0, 1, 2]
    with pytest.raises(GenIRError, match="exceeds"):
        rp.training_seeds(rp.Settings(dataset="squad-dev", preset="tiny", seeds=2, seed=2**32 - 1))


def test_the_seed_reaches_training_and_list_steps_shows_each_seed(tmp_path, monkeypatch, capsys):
    from genir_jax.training import dsi

    seen = []
    monkeypatch.setattr(dsi, "train_dsi", lambda *args, **options: seen.append(options.get("overrides")) or {})
    monkeypatch.setattr(dsi, "training_summary", lambda summary: summary)
    monkeypatch.setattr("genir_jax.training.reporting.training_lines", lambda *args: [])
    layout = rp.Layout(tmp_path).seed_layout(5)
    rp._train_full(layout, rp.Settings(dataset="squad-dev", preset="tiny", seeds=2, seed=5))
    rp._train_full(rp.Layout(tmp_path), rp.Settings(dataset="squad-dev", preset="tiny"))
    assert seen[0].seed == 5 and seen[1] is None
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["reproduce", "--out", str(out), "--seeds", "2", "--seed", "3", "--list-steps"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    per_seed = [step.name for step in rp.seed_steps(rp.Settings(dataset="squad-dev", preset="tiny"))]
    assert listed == ["prepare", "pretrain", *(f"seed-{s}/{name}" for s in (3, 4) for name in per_seed), "report"]
    assert main(["reproduce", "--out", str(out), "--seeds", "0", "--list-steps"]) == 2


@pytest.mark.slow  # minutes on 2 cores (twice the one-seed tiny run): run by the full suite, not the quick one
def test_tiny_reproduction_over_two_seeds_end_to_end(tmp_path, shared_data):
    """`reproduce --preset tiny --seeds 2` for real (one removed-document model): the first run stops at seed
    1's first step (a file where its model goes), the second skips every step of seed 0 and finishes seed 1; two
    seed folders on one prepared data set and base, and a pooled report with n = 2 x queries."""
    import os

    out = tmp_path / "run"
    args = ["reproduce", "--preset", "tiny", "--removed-models", "1", "--seeds", "2", "--out", str(out),
            "--data-dir", str(shared_data), "--no-progress"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}  # as the one-seed test

    def genir_jax():
        return subprocess.run([sys.executable, "-m", "genir_jax.cli.main", *args], capture_output=True, text=True,
                              timeout=1800, env=env)

    blocker = out / "seed-1" / "models" / "full"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a model folder")
    first = genir_jax()
    assert first.returncode != 0 and "seed-1 [1/" in first.stdout
    per_seed = [step.name for step in rp.seed_steps(rp.Settings(dataset="squad-dev", preset="tiny",
                                                                removed_models=1))]
    assert all((out / "seed-0" / ".steps" / f"{name}.json").is_file() for name in per_seed)
    blocker.unlink()
    second = genir_jax()
    assert second.returncode == 0, second.stderr[-3000:]
    skipped = [line for line in second.stdout.splitlines() if line.startswith("seed-0 [") and "skipped" in line]
    assert len(skipped) == len(per_seed) - 1  # all but its report, which is always rewritten
    assert "prepare: done" in second.stdout and "seed-1 [1/" in second.stdout
    assert not (out / "seed-0" / "data").exists() and (out / "data" / "test_queries.json").is_file()
    seeds = [json.loads((out / f"seed-{s}" / "models" / "full" / "train.json").read_text())["run"]["seed"]
             for s in (0, 1)]
    assert seeds == [0, 1]
    report = (out / "report.md").read_text()
    _, rows = _table(report, "statistic")
    hits = next(row for row in rows if row[0] == "DSI Hits@1 (test), %")
    queries = re.search(r"\(n=(\d+)\)$", hits[1]).group(1)  # seed 0's test queries
    assert hits[2].endswith(f"(n={queries})") and hits[3].endswith(f"(n=2x{queries})")
    for seed, cell in zip((0, 1), hits[1:3]):
        assert f"| DSI (ours, test) | {cell} |" in (out / f"seed-{seed}" / "report.md").read_text()
    _, claim_rows = _table(report, "the paper's claim (NQ10k, T5-large)")
    assert claim_rows and ("the seeds agree" in report or "the seeds DISAGREE" in report)
    assert json.loads((out / pooled.REPORT_JSON).read_text())["seeds"] == [0, 1]


def test_run_experiment_on_a_multi_seed_run_runs_it_in_every_seed_folder(tmp_path, monkeypatch):
    from genir_jax.paper import experiments
    from genir_jax.paper.panels import Experiment, Section

    def run(layout, settings, config):
        return {"folder": layout.root.name, "seed": settings.seed}

    toy = Experiment(id="toy", title="Toy", paper_ref="nowhere", command="none", paper={},
                     render=lambda layout: Section(""), position=1000, runs={"toy": run})
    monkeypatch.setattr(experiments, "registry", lambda: (toy,))
    layout = rp.Layout(tmp_path)
    layout.steps.mkdir(parents=True)
    (layout.steps / "settings.json").write_text(json.dumps(
        rp.Settings(dataset="squad-dev", preset="tiny", seeds=2, seed=4).record))
    rp.run_experiment(tmp_path, "toy", log=lambda *_: None)
    for seed in (4, 5):
        record = json.loads((layout.seed_layout(seed).steps / "toy.json").read_text())
        assert (record["folder"], record["seed"]) == (f"seed-{seed}", seed)
    assert not (layout.steps / "toy.json").exists()
