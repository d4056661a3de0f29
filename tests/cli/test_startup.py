"""Fixed costs: a light `import genir_jax` and argument parsing, and the persistent compilation cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import genir_jax
from genir_jax.cli import main as cli
from genir_jax.scale.compile_cache import default_cache_dir

HEAVY = ("jax", "flax", "transformers", "torch", "optax", "orbax")


def _python(code: str, **env: str) -> str:
    environment = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _heavy_after(statement: str) -> list[str]:
    code = (f"import sys\n{statement}\n"
            f"print('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    last = _python(code).strip().splitlines()[-1]
    assert last.startswith("heavy:"), last
    return [m for m in last[len("heavy:"):].split(",") if m]


def test_import_and_argument_parsing_do_not_load_jax_or_transformers():
    assert _heavy_after("import genir_jax") == []
    assert _heavy_after("from genir_jax.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass") == []
    for command in ("patch-stages", "circuit", "residual-rank", "neuron-reading", "crattn-reading", "crattn-writes",
                    "crattn-head-tokens", "swap-encoder", "inspect", "evaluate", "bm25", "reproduce"):
        statement = (f"from genir_jax.cli.main import main\ntry:\n    main([{command!r}, '--help'])\n"
                     "except SystemExit:\n    pass")
        assert _heavy_after(statement) == [], command


def test_lazy_public_names():
    assert genir_jax.__all__ == [
        "CheckpointError", "ConfigError", "GenIRError", "Patch", "PretrainedModel", "T5Config", "add_docid_tokens",
        "decode", "docid_token", "docid_token_ids", "docid_vocabulary", "encode", "expand_site_patterns", "forward",
        "forward_with_cache", "init_params", "load_pretrained", "logical_axes", "neuron_ablation", "param_shapes",
        "resize_token_embeddings", "save_pretrained", "site_name", "t5_v1_0", "t5_v1_1", "unembed",
    ]
    from genir_jax.core.model import forward

    assert genir_jax.forward is forward
    assert all(name in dir(genir_jax) for name in genir_jax.__all__)
    assert all(getattr(genir_jax, name) is not None for name in genir_jax.__all__)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        genir_jax.not_a_name  # noqa: B018


def test_command_summaries_match_their_parsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {choice.dest: choice.help for choice in sub._choices_actions} == cli.COMMANDS
    assert list(sub.choices) == list(cli.COMMANDS)


def test_cli_enables_the_cache_unless_told_not_to(monkeypatch, tmp_path):
    import genir_jax.scale.compile_cache as compile_cache

    calls = []
    monkeypatch.setattr(compile_cache, "enable_compilation_cache", lambda path=None: calls.append(path))
    missing = str(tmp_path / "missing")
    assert cli.main(["inspect", "--checkpoint", missing]) == 2  # the handler ran (and refused the path)
    assert calls == [None]
    assert cli.main(["--no-compile-cache", "inspect", "--checkpoint", missing]) == 2
    assert calls == [None]


def test_cache_directory_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("GENIR_JAX_CACHE", raising=False)
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "genir-jax", "xla")
    monkeypatch.setenv("GENIR_JAX_CACHE", str(tmp_path / "xla"))
    assert default_cache_dir() == str(tmp_path / "xla")
    for off in ("off", "OFF", "0", "false", "none"):
        monkeypatch.setenv("GENIR_JAX_CACHE", off)
        assert default_cache_dir() is None


def test_compilation_cache_persists_executables(tmp_path):
    """In a fresh process (the cache is process-wide state): every compilation is written, and a second
    process with the same directory finds it."""
    code = (
        "import os, jax, jax.numpy as jnp\n"
        "from genir_jax.scale.compile_cache import enable_compilation_cache\n"
        "print(enable_compilation_cache())\n"
        "print(float(jax.jit(lambda x: (x * 3.0).sum())(jnp.arange(7.0))))\n"
        "print(jax.config.jax_persistent_cache_min_compile_time_secs, "
        "jax.config.jax_persistent_cache_min_entry_size_bytes)\n"
    )
    cache = tmp_path / "xla"
    first = _python(code, GENIR_JAX_CACHE=str(cache)).split()
    assert first[:2] == [str(cache), "63.0"] and first[2:] == ["0.0", "-1"]
    entries = sorted(os.listdir(cache))
    assert entries, "nothing was written to the compilation cache"
    _python(code, GENIR_JAX_CACHE=str(cache))
    assert sorted(os.listdir(cache)) == entries  # found, not compiled and written again
    assert _python(code, GENIR_JAX_CACHE="off").split()[0] == "None"


def test_console_command_skips_interpreter_teardown_but_not_its_output(tmp_path):
    """As the console command (no argv), a finished command that loaded JAX ends with `os._exit` after the
    atexit handlers: its exit code and its whole (piped, buffered) stdout are kept, the handlers ran, and
    nothing after them does (a `__del__` at interpreter tear-down never prints)."""
    from genir_jax.core.config import t5_v1_0

    config = t5_v1_0(vocab_size=64, d_model=8, d_kv=4, d_ff=16, num_heads=2, num_layers=1, num_decoder_layers=1)
    genir_jax.save_pretrained(tmp_path / "ckpt", genir_jax.PretrainedModel(config=config,
                                                                           params=genir_jax.init_params(config, 0)))
    code = (
        "import atexit, sys\n"
        "class Teardown:\n"
        "    def __del__(self):\n"
        "        print('teardown', flush=True)\n"
        "keep = Teardown()\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        f"sys.argv = ['genir-jax', 'inspect', '--json', '--checkpoint', {str(tmp_path / 'ckpt')!r}]\n"
        "from genir_jax.cli.main import main\n"
        "sys.exit(main())\n"
    )
    out = _python(code, GENIR_JAX_CACHE="off").splitlines()
    assert out[-1] == "atexit ran" and "teardown" not in out
    import json

    summary = json.loads("\n".join(out[:-1]))
    assert summary["decoder_layers"] == 1 and summary["vocab_size"] == 64
    # in-process calls (argv given) return normally
    assert cli.main(["--no-compile-cache", "inspect", "--checkpoint", str(tmp_path / "ckpt")]) == 0


def test_the_compilation_cache_is_bounded(tmp_path):
    """$GENIR_JAX_CACHE_MAX_GB bounds the cache directory: half for XLA's executables (JAX evicts the least
    recently used), half for the programs folder; a bad value is one line, exit 2."""
    code = ("import jax\nfrom genir_jax.scale.compile_cache import enable_compilation_cache\n"
            "from genir_jax.base import program_cache\n"
            "enable_compilation_cache()\n"
            "print(jax.config.jax_compilation_cache_max_size, program_cache._max_bytes)\n")
    assert _python(code, GENIR_JAX_CACHE=str(tmp_path / "xla")).split() == [str(4 << 30), str(4 << 30)]
    half = str((1 << 30) // 4)
    assert _python(code, GENIR_JAX_CACHE=str(tmp_path / "xla"), GENIR_JAX_CACHE_MAX_GB="0.5").split() == [half, half]
    for bad in ("-1", "lots", "nan", "0"):
        done = subprocess.run([sys.executable, "-m", "genir_jax.cli.main", "inspect", "--checkpoint", str(tmp_path)],
                              capture_output=True, text=True, cwd=os.getcwd(),
                              env={**os.environ, "GENIR_JAX_CACHE": str(tmp_path / "xla"), "GENIR_JAX_CACHE_MAX_GB": bad})
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().splitlines() == [
            f"genir-jax inspect: error: $GENIR_JAX_CACHE_MAX_GB must be a positive number of gigabytes, got {bad!r}"]
