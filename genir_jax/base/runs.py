"""One output folder, one run: a lock held for a run's lifetime, and a refusal of another run's outputs.

`output_lock(path)` holds an exclusive `fcntl.flock` on a lock file for `path` while a command writes there,
so a second run into the same folder is refused at once (one line naming the folder) instead of interleaving
its files with the first's. The kernel releases the lock when the process ends, however it ends (SIGKILL
too), so a killed run never leaves a stale lock. Lock files live outside the output, in a per-user folder
(``/tmp/genir-jax-<uid>/locks``), named by a hash of the output's real path: the output folder holds only the
command's outputs, and its parent gains nothing. (Runs on other machines sharing a network folder are not
seen.)

`claim_output(path, record, settings, outputs)` tells whether the outputs a folder holds are this run's own:
the settings record the command writes (``record``, a JSON file with a ``"settings"`` object, e.g.
sweep.json) says the same settings. Another run's outputs are refused unless ``overwrite``; then the caller
removes them when it commits its own (`genir_jax.base.io.atomic_directory(..., stale=...)`), so no file of
the earlier run stays beside the new ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from typing import Any, Iterable, Iterator, Mapping

from genir_jax.base.errors import GenIRError

_held: dict[str, int] = {}  # lock file -> nesting depth, for locks this process holds


def lock_directory() -> str:
    """The per-user folder of lock files, ``/tmp/genir-jax-<uid>/locks`` (created 0700; refused when another
    user owns it). Fixed, not taken from the environment ($TMPDIR, $XDG_RUNTIME_DIR): two sessions of one
    user with different environments must still find each other's locks."""
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    owner = os.path.join(base, f"genir-jax-{os.getuid()}")
    folder = os.path.join(owner, "locks")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for checked in (owner, folder):
        status = os.lstat(checked)
        if os.path.islink(checked) or status.st_uid != os.getuid():
            raise GenIRError(f"{checked}: the folder of genir-jax's run locks belongs to another user")
    return folder


def lock_file(path: str | os.PathLike) -> str:
    """The lock file of output folder `path` (one per real path: links to one folder share it)."""
    real = os.path.realpath(os.fspath(path))
    return os.path.join(lock_directory(), hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:32]
                        + ".lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, option: str = "-o/--output") -> Iterator[None]:
    """Hold the run lock of output folder `path` for the block; `GenIRError` naming `option` and the folder
    when another process holds it. Re-entrant within one process."""
    import fcntl

    name = lock_file(path)
    if name in _held:
        _held[name] += 1
        try:
            yield
        finally:
            _held[name] -= 1
        return
    while True:
        handle = os.open(name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(handle, 64).decode(errors="replace").split()
            os.close(handle)
            who = f" (process {holder[0]})" if holder else ""
            raise GenIRError(f"{option} {os.fspath(path)}: another genir-jax run{who} is writing into this folder; "
                             "wait for it to finish or choose another folder") from None
        try:  # the holder before us may have removed the file between our open and our flock: lock the new one
            same = os.path.samestat(os.fstat(handle), os.stat(name))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(handle)
    os.ftruncate(handle, 0)
    os.write(handle, f"{os.getpid()}\n".encode())
    _held[name] = 1
    try:
        yield
    finally:
        del _held[name]
        with contextlib.suppress(OSError):
            os.unlink(name)  # while still locked: a waiting opener sees another inode and retries
        os.close(handle)


def normalise_settings(settings: Mapping[str, Any]) -> dict:
    """Settings as a JSON record gives them back (tuples -> lists, keys -> str, others as str), to compare."""
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=str))


_ABSENT = object()


def settings_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: stored X, now Y`` for every key whose value differs (missing keys shown as <absent>)."""
    def show(value) -> str:
        return "<absent>" if value is _ABSENT else json.dumps(value)

    return [f"{key}: stored {show(old.get(key, _ABSENT))}, now {show(new.get(key, _ABSENT))}"
            for key in sorted(set(old) | set(new)) if old.get(key, _ABSENT) != new.get(key, _ABSENT)]


def _recorded_settings(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    settings = record.get("settings") if isinstance(record, dict) else None
    return settings if isinstance(settings, dict) else None


def claim_output(path: str | os.PathLike, record: str, settings: Mapping[str, Any], outputs: Iterable[str], *,
                 overwrite: bool = False, option: str = "-o/--output") -> list[str]:
    """The entries of output folder `path` this run must remove when it commits: another run's outputs, only
    with `overwrite`. `outputs`: the names the command writes (`fnmatch` patterns, `record` among them);
    other entries (a checkpoint the folder also holds, say) are never this mechanism's business. A folder
    without such outputs, or whose `record` (a JSON file there) holds the same ``"settings"``, is this
    run's own: []. Anything else is another run's outputs: a `GenIRError` naming the folder and the
    differences unless `overwrite`."""
    import fnmatch

    path = os.fspath(path)
    try:
        names = sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    patterns = list(outputs)
    found_outputs = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not found_outputs:
        return []
    found = _recorded_settings(os.path.join(path, record))
    ours = normalise_settings(settings)
    if found == ours:
        return []
    if overwrite:
        return found_outputs
    if found is None:
        shown = ", ".join(found_outputs[:3]) + (", ..." if len(found_outputs) > 3 else "")
        why = f"{shown} but no {record} of these settings"
    else:
        why = "; ".join(settings_difference(found, ours))
    raise GenIRError(f"{option} {path}: holds the outputs of another run ({why}); pass --overwrite to replace "
                     "them, or choose another folder")
