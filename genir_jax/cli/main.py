"""The `genir-jax` command line.

Each subcommand lives in its own module under `genir_jax.cli.commands` and exposes ``add_parser(subparsers)``,
which registers its arguments and a ``handler(args) -> int``. Errors caused by bad input (`GenIRError`)
print one clear line and exit with code 2; nothing half-written is left behind. So do argparse's usage
errors (`main(argv)` returns their 2); numeric options are range-checked while parsing (`genir_jax.base.options`). So does any `OSError`
(writing an output: permission denied, disk full, ...), naming the path. An output directory (`-o`) that is
a file, a link to one, or lies in a folder we cannot write is refused before the command computes anything
(`genir_jax.base.io.check_output_dir`). Ctrl-C (SIGINT) exits with code 130 and one line, no traceback: staged
outputs are removed, and a commit of finished files is completed first (`genir_jax.base.io.deferred_interrupt`).
That holds at any moment: as the console command, SIGINT is recorded from the first line of this module on,
and an interrupt that some "Exception ignored" context swallowed still stops every later commit
(`genir_jax.base.interrupts`); once the command has returned, SIGINT no longer changes its exit code. Two runs
never write into one output folder at once: `-o` is locked for the command's lifetime
(`genir_jax.base.runs.output_lock`), and a second run into it exits 2 naming the folder.

Subcommands are discovered (`_discover`: every command module with ``add_parser``, listed by its ``ORDER``
with its ``SUMMARY``); only the chosen one registers its arguments, and handlers import JAX, Flax and
transformers themselves, so
``genir-jax --help`` and argument errors answer without loading them. Every command runs with the
persistent XLA compilation cache (`genir_jax.scale.compile_cache`) unless ``--no-compile-cache`` is given or
``GENIR_JAX_CACHE=off``. The libraries' log lines (transformers, bm25s) are hidden below warnings
(`genir_jax.base.verbosity`) unless ``-v/--verbose`` is given (before or after the command's name). As the
console command computing on the CPU, glibc is first asked to keep freed memory
(`genir_jax.scale.host_memory`; ``GENIR_JAX_HOST_MEMORY=default`` opts out). As the console command, a
finished command that loaded JAX ends after the atexit handlers without the interpreter's slow tear-down
of JAX (`_leave_now`); `main(argv)` returns normally and changes neither.
"""

from __future__ import annotations

import os
import signal
import sys

from genir_jax.base import interrupts

_CONSOLE = __name__ == "__main__" or os.path.basename(sys.argv[0] if sys.argv else "") == "genir-jax"
if _CONSOLE:  # Ctrl-C while the modules below load: recorded, then honoured by main() (no import traceback)
    signal.signal(signal.SIGINT, interrupts.record_only)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
from typing import Iterable  # noqa: E402

from genir_jax import __version__  # noqa: E402
from genir_jax.base.errors import GenIRError  # noqa: E402


def _discover() -> dict[str, str]:
    """Every subcommand: each module of `genir_jax.cli.commands` that defines ``add_parser`` is one, named by its
    module (``patch_stages`` -> ``patch-stages``), listed by its ``ORDER`` with its ``SUMMARY`` (command modules
    import only argparse-level code at the top, so discovering them loads neither JAX nor transformers). A new
    command is its module, nothing else."""
    import pkgutil

    from genir_jax.cli import commands

    found = []
    for info in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "add_parser"):
            found.append((module.ORDER, info.name.replace("_", "-"), module.SUMMARY))
    return {name: summary for _, name, summary in sorted(found)}


# Subcommand -> the summary its module gives (its `add_parser` uses the same text as `help`).
COMMANDS = _discover()


def command_module(name: str):
    """The module of subcommand `name` (e.g. ``patch-stages`` -> `genir_jax.cli.commands.patch_stages`)."""
    return importlib.import_module(f"genir_jax.cli.commands.{name.replace('-', '_')}")


class _Parser(argparse.ArgumentParser):
    """argparse, with the range errors of `genir_jax.base.options` read as "--seed must be >= 0, got -1"."""

    def error(self, message: str):
        if message.startswith("argument ") and ": must be " in message:
            flag, _, reason = message[len("argument "):].partition(": ")
            message = f"{flag} {reason}"
        super().error(message)


VERBOSE_HELP = ("show the libraries' log lines (transformers, bm25s, JAX) down to debug level; by default only "
                "their warnings and errors")


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. `commands`: the subcommands registered in full (their modules imported); the
    others are listed with their summary only. None: all of them in full."""
    full = set(COMMANDS) if commands is None else set(commands)
    parser = _Parser(
        prog="genir-jax",
        description="Mechanistic interpretability of generative retrieval (DSI-style T5) models in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"genir-jax {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)  # and after every command
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not use the persistent XLA compilation cache ($GENIR_JAX_CACHE, default "
                             "~/.cache/genir-jax/xla; GENIR_JAX_CACHE=off also disables it)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, summary in COMMANDS.items():
        if name in full:
            command_module(name).add_parser(subparsers)
            # also after the command's name; SUPPRESS: absent there, it leaves `genir-jax -v COMMAND`'s value
            subparsers.choices[name].add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                                  help=VERBOSE_HELP)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named on a command line (the first word that is not an option), if it is one."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv_given = argv is not None
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = _chosen_command(argv)
    if argv_given:
        interrupts.clear_interrupt()  # an earlier command of this process was interrupted: not this one
    with interrupts.console_interrupts():
        try:
            try:
                interrupts.raise_if_interrupted()  # Ctrl-C while this module was loading
                code = _parse_and_run(argv, argv_given, chosen)
            finally:
                if not argv_given:  # the command has finished: a Ctrl-C from now on changes neither outputs nor code
                    signal.signal(signal.SIGINT, interrupts.record_only)
        except KeyboardInterrupt:  # while parsing or starting, before `_run` could catch it
            print(f"genir-jax{' ' + chosen if chosen else ''}: interrupted", file=sys.stderr)
            code = 130
    if not argv_given and code == 130:  # Ctrl-C as the console command: no clean-up, which can race JAX's threads
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    if not argv_given and "jax" in sys.modules:
        _leave_now(code)  # the console command: skip the interpreter's tear-down of JAX, slow and, after an error
        # with background threads still running (orbax's), noisy
    return code


def _parse_and_run(argv: list[str], argv_given: bool, chosen: str | None) -> int:
    parser = build_parser([chosen] if chosen else [])
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # a usage error (exit 2) is returned as every other bad input; --help still exits
        if not argv_given or not stop.code:
            raise
        return int(stop.code)
    if not argv_given:
        from genir_jax.scale.host_memory import computes_on_cpu, keep_freed_host_memory

        if computes_on_cpu():
            keep_freed_host_memory()  # before JAX starts: XLA:CPU's step buffers then stop page-faulting
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The chosen command's handler, with bad input (`GenIRError`, `OSError`) as one line and exit code 2, and
    Ctrl-C as one line and exit code 130. Holds the run lock of the output folder (`-o`) while it runs."""
    from genir_jax.base.verbosity import set_verbosity

    set_verbosity(getattr(args, "verbose", False))  # before any handler imports transformers or bm25s
    try:
        with contextlib.ExitStack() as stack:
            from genir_jax.base.io import deferred_interrupt

            with deferred_interrupt():  # a KeyboardInterrupt inside jaxlib's native start-up aborts the process
                import jax  # noqa: F401  (SIGABRT, a C++ traceback): Ctrl-C is raised once it has loaded

                if not args.no_compile_cache:
                    from genir_jax.scale.compile_cache import enable_compilation_cache

                    enable_compilation_cache()
            from genir_jax.cli.paths import resolve_placeholders

            resolve_placeholders(args)
            from genir_jax.analysis.applicability import check_applicable

            check_applicable(args.command, getattr(args, getattr(args, "checkpoint_option", "checkpoint"), None))
            output = getattr(args, "output", None)
            if isinstance(output, str):
                from genir_jax.base.io import check_output_dir
                from genir_jax.base.runs import output_lock

                check_output_dir(output)  # a file, a link to one, a read-only folder: refused before any computation
                if getattr(args, "process_id", None) in (None, 0):  # a multi-process run's other processes share
                    stack.enter_context(output_lock(output))  # its folder; one run at a time writes into one folder
            return int(args.handler(args) or 0)
    except GenIRError as exc:
        print(f"genir-jax {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing outputs (disk full, permissions, a path that turned into a file, ...)
        where = exc.filename if exc.filename is not None else getattr(args, "output", None)
        reason = exc.strerror or str(exc)
        print(f"genir-jax {args.command}: error: {where}: {reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: outputs are staged and removed, or were committed whole (genir_jax.base.io)
        print(f"genir-jax {args.command}: interrupted", file=sys.stderr)
        return 130


def _leave_now(code: int) -> None:
    """End the process with `code` after the atexit handlers (JAX's own clean-up, logging) but without
    interpreter finalisation: tearing down JAX's modules and runtime objects takes 0.3-0.6 s and there is
    nothing of ours left to do (outputs are committed and closed, standard streams are flushed). The one private
    name the package uses: Python has no public way to run the atexit handlers before `os._exit`; where it
    is missing this returns and the process ends the ordinary way."""
    import atexit

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; no public equivalent runs them now
    if run_exit_handlers is None:  # another Python: the ordinary exit (handlers, then the tear-down)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
