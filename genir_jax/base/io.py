"""Atomic file output: write to a temporary name next to the target, then rename.

Bad input must never leave half-written outputs, and an interrupted run must never leave a truncated
file that a later run mistakes for a finished one. Everything genir-jax writes goes through here.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Iterable, Iterator

from genir_jax.base.errors import DataError, GenIRError
from genir_jax.base.interrupts import note_interrupt, raise_if_interrupted

# A staging directory of `atomic_directory` is named ``.<output name>.<pid>.<random>.tmp`` beside the output.
# One left behind by a process that was killed (SIGKILL, power loss) is removed by the next
# `atomic_directory` for the same output when its process no longer exists on this machine, or, whatever
# the process id says (ids are reused; a legacy name has none), when it was last modified more than
# STALE_STAGING_SECONDS ago.
STALE_STAGING_SECONDS = 7 * 24 * 3600


def open_text(path: str):
    """A text file (gzip when it ends in .gz) opened as UTF-8; DataError when it is missing or a directory."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a file")
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text_file(path: str | os.PathLike) -> str:
    """The whole text of a UTF-8 file (optionally gzip); an unreadable one is a `DataError` naming it."""
    path = os.fspath(path)
    try:
        with open_text(path) as handle:
            return handle.read()
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc


def read_json(path: str | os.PathLike) -> Any:
    """Parse one JSON file (optionally gzip) into Python objects; errors name line and column."""
    path = os.fspath(path)
    text = read_text_file(path)
    if not text.strip():  # not "invalid JSON at line 1": the file holds nothing at all
        raise DataError(f"{path}: is empty; expected JSON")
    try:
        return loads_json(text, path)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc


_TOO_LONG = object()  # stands for an integer too long to convert while locating it


def loads_json(text: str, path: str, location: str | None = None) -> Any:
    """`json.loads`; an integer longer than Python converts (`sys.get_int_max_str_digits`, e.g. a
    5,000-digit id) is a `DataError` naming `path` and the record (`location`, else the list index)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:
        lengths: list[int] = []

        def keep(token: str):
            try:
                return int(token)
            except ValueError:
                lengths.append(len(token.lstrip("-")))
                return _TOO_LONG

        data = json.loads(text, parse_int=keep)  # parses now: the error was an integer, found here
        if not lengths:
            raise DataError(f"{path}: {location or 'file'}: cannot be parsed ({exc})") from None
        where = location or _holding(data, _TOO_LONG)
        raise DataError(f"{path}: {where}: an integer of {lengths[0]} digits, more than Python converts "
                        f"({sys.get_int_max_str_digits()}); write such an id as a string") from None


def _holding(data: Any, marker: object) -> str:
    """Which record of a parsed JSON file holds `marker` (its list index, or its top-level key)."""
    def holds(value) -> bool:
        if value is marker:
            return True
        if isinstance(value, dict):
            return any(holds(v) for v in value.values())
        return isinstance(value, list) and any(holds(v) for v in value)

    if isinstance(data, list):
        return next(f"record index {i}" for i, record in enumerate(data) if holds(record))
    if isinstance(data, dict):
        return next(f"field {key!r}" for key, value in data.items() if holds(value))
    return "the top-level value"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file path; on success it is renamed to `path`, on error removed."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        yield temp
        if os.path.isfile(temp):  # mkstemp creates 0600; give the file the mode a plain open() would
            os.chmod(temp, 0o666 & ~_umask())
        raise_if_interrupted()  # an interrupt some handler swallowed still stops the commit
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write a text file (UTF-8)."""
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = None, *, allow_nan: bool = True) -> None:
    """Atomically write a JSON file. ``allow_nan=False`` refuses NaN and infinities (they are not JSON) with a
    `GenIRError` naming the file, before anything is written."""
    try:
        text = json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=allow_nan)
    except ValueError as exc:
        raise GenIRError(f"{os.fspath(path)}: refusing to write a non-finite number ({exc})") from None
    write_text(path, text + "\n")


def check_output_dir(path: str | os.PathLike, option: str = "-o/--output") -> str:
    """Refuse, before any computation, an output directory that cannot be written: an existing file (or a
    symbolic link to one, or a dangling link), a path below a file, or a directory (or its nearest existing
    ancestor) we may not write in. Raises `GenIRError` naming `option` and the path; returns the path."""
    path = os.fspath(path)
    if not path or "\0" in path:
        raise GenIRError(f"{option}: {path!r} is not a valid path")
    if os.path.lexists(path) and not os.path.isdir(path):
        what = "a symbolic link to a file" if os.path.islink(path) and os.path.exists(path) else \
            "a dangling symbolic link" if os.path.islink(path) else "a file"
        raise GenIRError(f"{option} {path}: exists and is not a directory ({what})")
    # atomic_directory stages beside the output (in its parent) and then moves into it: both must be writable
    probe = os.path.abspath(path)
    checks = [probe] if os.path.isdir(probe) else []
    parent = os.path.dirname(probe)
    while not os.path.isdir(parent):
        if os.path.lexists(parent):
            raise GenIRError(f"{option} {path}: {parent} is not a directory")
        parent = os.path.dirname(parent)
    checks.append(parent)
    for directory in checks:
        if not os.access(directory, os.W_OK | os.X_OK):
            raise GenIRError(f"{option} {path}: cannot write in {directory} (permission denied)")
        # os.access trusts permission bits, which root ignores; a read-only or special filesystem (sysfs, a
        # read-only mount) refuses root too, so try for real: create and remove one hidden directory
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".genir-write-probe-", dir=directory))
        except OSError as error:
            raise GenIRError(f"{option} {path}: cannot write in {directory} ({error.strerror or error})") from None
    return path


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (another user's) or not a usable id: keep it
    return True


def remove_stale_staging(path: str | os.PathLike) -> list[str]:
    """Remove staging directories of `path` left by killed runs (the rule above); returns those removed."""
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.dirname(path), os.path.basename(path)
    prefix = f".{base}."
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        middle = name[len(prefix):-len(".tmp")]
        full = os.path.join(parent, name)
        if os.path.islink(full) or not os.path.isdir(full):
            continue
        match = re.fullmatch(r"(\d+)\.[a-z0-9_]+", middle)  # exactly <pid>.<random>: not another output's
        pid_text = match.group(1) if match else ""
        try:
            old = now - os.lstat(full).st_mtime > STALE_STAGING_SECONDS
        except OSError:
            continue
        dead = pid_text.isdigit() and int(pid_text) != os.getpid() and not _process_alive(int(pid_text))
        if dead or old:
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, stale: Iterable[str] = ()) -> Iterator[str]:
    """Yield a temporary directory; on success its files are moved into `path` (created if needed).

    Files already in `path` with other names are kept, except those named in `stale` (another run's outputs
    being overwritten, `genir_jax.base.runs.claim_output`), which are removed in the same commit; files with
    the same names are replaced.
    Nothing is committed after an interrupt (`genir_jax.base.interrupts`). On error the temporary directory is removed and `path` is left as it was. The temporary directory is
    ``.<name>.<pid>.<random>.tmp`` beside `path`; those of killed runs are removed first (see
    `remove_stale_staging`).
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(path)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.{os.getpid()}.", suffix=".tmp",
                               dir=parent)
    try:
        yield staging
        with deferred_interrupt():  # Ctrl-C while moving files in would leave some old, some new
            raise_if_interrupted()
            os.chmod(staging, 0o777 & ~_umask())
            os.makedirs(path, exist_ok=True)
            new = os.listdir(staging)
            for name in sorted(set(stale) - set(new)):
                remove_path(os.path.join(path, name))
            for name in new:
                target = os.path.join(path, name)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                os.replace(os.path.join(staging, name), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file, a link or a whole directory tree; nothing when it does not exist."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold SIGINT back while the block runs (in the main thread; elsewhere it is a no-op) and raise the
    KeyboardInterrupt when it ends, so a commit of several files is never cut in half."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: (note_interrupt(), received.append(signum)))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
