"""`-v/--verbose`: one global option, accepted before or after any command's name."""

from __future__ import annotations

import pytest

from genir_jax.cli.main import COMMANDS, build_parser


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_verbose_after_its_name(command, capsys):
    with pytest.raises(SystemExit):
        build_parser([command]).parse_args([command, "--help"])
    assert "-v, --verbose" in capsys.readouterr().out


def test_verbose_before_or_after_the_command():
    parser = build_parser(["bm25"])
    for argv, verbose in ((["bm25"], False), (["-v", "bm25"], True), (["bm25", "-v"], True),
                          (["--verbose", "bm25"], True), (["bm25", "--verbose"], True)):
        assert parser.parse_args(argv + ["-o", "x"]).verbose is verbose, argv
