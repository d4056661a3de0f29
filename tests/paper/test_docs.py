"""Every code block of README.md and docs/*.md runs: a block that stops working fails here.

Blocks are found by their fences (```python, ```bash, ```sh; no other fence is allowed). A comment line right
before a block says how it runs:
- ``<!-- run-with: NAME -->`` (Python): executed with the variables of context NAME (`_CONTEXTS`), e.g. a
  small random checkpoint in place of a path, then checked by that context;
- ``<!-- not-run: why -->`` (shell, for hardware, the network or long training): every ``genir-jax``
  command must parse, and every other command must be one we can check (files and extras it names exist);
- nothing: Python is executed as written in a temporary folder; shell lines are ``genir-jax`` commands,
  run in-process by `genir_jax.cli.main.main` in a folder holding the output of the README's
  ``genir-jax reproduce`` (the `reproduced` fixture runs that block itself).
Blocks reading reproduce's output are `slow` (a tiny reproduction takes minutes on 2 CPU cores).
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*(run-with|not-run):\s*(.*?)\s*-->\s*\Z", re.S)


@dataclasses.dataclass(frozen=True)
class Block:
    path: pathlib.Path
    line: int
    language: str
    code: str
    marker: tuple[str, str] | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"

    @property
    def needs_reproduction(self) -> bool:
        if self.language == "python":
            return self.marker == ("run-with", "reproduce")
        return self.marker is None


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            before = text[:match.start()].rstrip("\n")
            last_line = before.rsplit("\n", 1)[-1]
            marker = MARKER.search(last_line)
            found.append(Block(path, text.count("\n", 0, match.start()) + 1, match.group(1).strip(), match.group(2),
                               (marker.group(1), marker.group(2)) if marker else None))
    return found


def _params(kind: tuple[str, ...]):
    out = []
    for block in blocks():
        if block.language in kind:
            marks = [pytest.mark.slow] if block.needs_reproduction else []
            out.append(pytest.param(block, id=block.id, marks=marks))
    return out


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, `&&` chains split."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return [command for command in commands if command]


# --------------------------------------------------------------------------------------------------
# Every block is accounted for
# --------------------------------------------------------------------------------------------------

def test_docs_have_the_pages_and_only_runnable_blocks():
    names = {path.name for path in DOCS}
    for page in ("index.md", "api.md", "sweeps-and-attribution.md", "docid-schemes.md", "training-and-presets.md",
                 "meshes-and-pods.md", "reference-agreement.md", "results.md", "speed.md"):
        assert page in names, page
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 300
    for block in blocks():
        assert block.language in ("python", "bash", "sh"), f"{block.id}: a ```{block.language} block is not run"
        if block.marker is not None:
            kind, value = block.marker
            if block.language == "python":
                assert kind == "run-with" and value in _CONTEXTS, f"{block.id}: unknown marker {block.marker}"
            else:
                assert kind == "not-run" and value, f"{block.id}: a shell block is run or marked not-run: why"
    mkdocs = (REPO_ROOT / "mkdocs.yml").read_text()
    for path in DOCS[1:]:
        assert path.name in mkdocs, f"{path.name} is not in mkdocs.yml's nav"


def test_the_readme_test_command_is_what_ci_runs():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    readme = [block for block in blocks() if block.path.name == "README.md" and block.language != "python"]
    pytest_lines = [command for block in readme for command in shell_commands(block.code)
                    if command[:3] == ["python", "-m", "pytest"]]
    assert pytest_lines == [["python", "-m", "pytest", "-q", "--durations=25"]]
    assert ci.rstrip().splitlines()[-1] == "python -m pytest -q --durations=25"


# --------------------------------------------------------------------------------------------------
# Shell blocks
# --------------------------------------------------------------------------------------------------

def _check_parses(argv: list[str], where: str) -> None:
    from genir_jax.cli.main import build_parser

    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse's errors
        raise AssertionError(f"{where}: `genir-jax {shlex.join(argv)}` does not parse") from exc


def _check_not_run_command(command: list[str], where: str) -> None:
    """A command of a not-run block: genir-jax ones parse; the others name files and extras that exist."""
    program, args = command[0], command[1:]
    if program == "genir-jax":
        _check_parses(args, where)
    elif program == "gcloud":  # a command run on every host: its --command is a genir-jax command
        inner = shlex.split(args[args.index("--command") + 1])
        assert inner[0] == "genir-jax", where
        _check_parses(inner[1:], where)
    elif program in (".", "source"):
        assert args[0].endswith("/bin/activate"), where
    elif program == "python" and args[:2] == ["-m", "venv"]:
        assert len(args) == 3, where
    elif program == "python" and args[:2] == ["-m", "pytest"]:
        pass  # checked against .ci/run above
    elif program == "pip" and args[:1] == ["install"]:
        if args[1] == "-r":
            assert (REPO_ROOT / args[2]).is_file(), f"{where}: {args[2]} is missing"
        else:
            assert args[1] == "-e", where
            match = re.fullmatch(r"\.(?:\[(\w+)\])?", args[2])
            assert match, where
            if match.group(1):
                setup = configparser.ConfigParser()
                setup.read(REPO_ROOT / "setup.cfg")
                assert match.group(1) in setup["options.extras_require"], f"{where}: no extra {match.group(1)}"
    else:
        raise AssertionError(f"{where}: cannot check `{shlex.join(command)}`")


@pytest.mark.parametrize("block", _params(("bash", "sh")))
def test_shell_block(block: Block, request, monkeypatch):
    commands = shell_commands(block.code)
    assert commands, f"{block.id}: no commands"
    if block.marker is not None:  # not-run
        for command in commands:
            _check_not_run_command(command, block.id)
        return
    from genir_jax.cli.main import main

    run = request.getfixturevalue("reproduced")
    monkeypatch.chdir(run.cwd)
    for command in commands:
        assert command[0] == "genir-jax", f"{block.id}: `{shlex.join(command)}` is not run here; mark the block"
        if command[1] == "reproduce":  # the fixture ran this very command
            assert command in run.commands, f"{block.id}: {command}"
            continue
        assert main(command[1:]) == 0, f"{block.id}: `{shlex.join(command)}` failed"
        output = command[command.index("-o") + 1]
        assert any(pathlib.Path(output).glob("*.csv")), f"{block.id}: no CSV in {output}"


@dataclasses.dataclass
class Reproduction:
    cwd: pathlib.Path
    commands: list[list[str]]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, shared_data) -> Reproduction:
    """The README's `genir-jax reproduce` block, run as written in a fresh folder (data from `shared_data`).

    It runs in its own process on ONE CPU device, as test_reproduce.py's end-to-end test does: with four
    simulated CPU devices on two busy cores, DSI training has been seen to stall at an all-reduce."""
    commands = [command for block in blocks() if block.path.name == "README.md" and block.marker is None
                and block.language in ("bash", "sh") for command in shell_commands(block.code)
                if command[:2] == ["genir-jax", "reproduce"]]
    assert len(commands) == 1, commands
    cwd = tmp_path_factory.mktemp("readme")
    env = {**os.environ, "GENIR_JAX_DATA": str(shared_data), "PYTHONPATH": str(REPO_ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "-m", "genir_jax.cli.main", *commands[0][1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (cwd / "runs" / "squad-dev-tiny" / "report.md").is_file()
    return Reproduction(cwd, commands)


# --------------------------------------------------------------------------------------------------
# Python blocks: contexts give a block what it needs and check what it did
# --------------------------------------------------------------------------------------------------

def _checkpoint(block: Block, request, tmp_path):
    """A tiny random DSI-vocabulary checkpoint in place of the path the block loads."""
    hf_checkpoint, t5_tokenizer = request.getfixturevalue("hf_checkpoint"), request.getfixturevalue("t5_tokenizer")
    directory, _ = hf_checkpoint("dsi", tokenizer=t5_tokenizer, vocab_size=32128, d_model=16, d_kv=4, d_ff=32,
                                 num_layers=1, num_heads=2)
    assert '"path/to/DSI-large-NQ10k"' in block.code
    code = block.code.replace('"path/to/DSI-large-NQ10k"', repr(str(directory)))

    def check(namespace):
        assert namespace["logits"].shape == (1, 1, 32128)
        assert namespace["model"].config.vocab_size == 32102
        assert (tmp_path / "exported" / "model.safetensors").is_file()
    return code, {}, check


def _interventions(block: Block, request, tmp_path):
    """A model with a 17-layer decoder (the block names decoder layer 16) and a random batch."""
    import numpy as np

    import genir_jax as gj

    directory, _ = request.getfixturevalue("hf_checkpoint")("iv", num_layers=2, num_decoder_layers=17, num_heads=4)
    model = gj.load_pretrained(directory)
    rng = np.random.default_rng(0)
    namespace = {"gj": gj, "cfg": model.config, "params": model.params,
                 "ids": rng.integers(1, model.config.vocab_size, (3, 5)), "mask": np.ones((3, 5), np.int32),
                 "start": np.zeros((3, 1), np.int32)}

    def check(ns):
        clean = gj.forward(model.config, model.params, ns["ids"], ns["mask"], ns["start"])
        assert ns["logits"].shape == clean.shape
        assert not np.allclose(ns["logits"], clean)  # the ablations change the output
    return block.code, namespace, check


def _sweep(block: Block, request, tmp_path):
    """A random 1+3-layer model, a batch and its argmax tokens as targets."""
    import numpy as np

    import genir_jax as gj

    cfg = gj.t5_v1_0(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=3, num_heads=4,
                     dropout_rate=0.0)
    params = gj.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(2, 64, (5, 6)), np.ones((5, 6), np.int32)
    logits = np.asarray(gj.forward(cfg, params, ids, mask, np.zeros((5, 1), np.int32)))[:, 0]
    namespace = {"cfg": cfg, "params": params, "ids": ids, "mask": mask, "targets": logits.argmax(-1)}

    def check(ns):
        assert ns["result"].values["rank"].shape == (3 * 4, 5)
        assert (tmp_path / "heads.png").stat().st_size > 1000
    return block.code, namespace, check


def _reproduce(block: Block, request, tmp_path):
    """The folder holding the README's reproduction (runs/squad-dev-tiny)."""
    run = request.getfixturevalue("reproduced")

    def check(ns):
        import numpy as np

        assert len(ns["targets"]) >= 1 and ns["logits"].shape[0] == len(ns["targets"])
        assert not np.allclose(ns["logits"], ns["patched"])
        assert len(ns["result"].summary()) == 3 * 3  # the tiny model: 3 decoder layers x 3 components
    return block.code, {}, check, run.cwd


_CONTEXTS = {"checkpoint": _checkpoint, "interventions": _interventions, "sweep": _sweep, "reproduce": _reproduce}


@pytest.mark.parametrize("block", _params(("python",)))
def test_python_block(block: Block, request, tmp_path, monkeypatch):
    code, namespace, check, *cwd = (_CONTEXTS[block.marker[1]](block, request, tmp_path) if block.marker
                                    else (block.code, {}, lambda ns: None))
    monkeypatch.chdir(cwd[0] if cwd else tmp_path)
    exec(compile(code, block.id, "exec"), namespace)
    check(namespace)
