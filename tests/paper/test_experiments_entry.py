"""`python -m experiments`: lists the registry's experiments and refuses what it cannot run."""

import pytest

from experiments.__main__ import main
from genir_jax.paper.experiments import registry


def test_lists_every_registered_experiment(capsys):
    assert main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [experiment.id for experiment in registry()]


def test_refuses_unknown_names_and_folders(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["table99", "--run", str(tmp_path)])
    assert stop.value.code == 2 and "unknown experiment 'table99'" in capsys.readouterr().err
    assert main(["table3_stage_patching", "--run", str(tmp_path)]) == 2  # by module name: found, folder refused
    assert "not a reproduction directory" in capsys.readouterr().err
