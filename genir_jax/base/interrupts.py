"""Ctrl-C that is never lost: SIGINT recorded in a flag that commits of outputs honour.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread happens to be. Raised inside a gc
callback (JAX's ``_xla_gc_callback``), a ``__del__`` or an atexit function, it is printed as "Exception
ignored in ..." and dropped, and the command runs on and writes its outputs. Under `console_interrupts`
(what the command line runs in) the SIGINT handler records the interrupt before raising, such a dropped
KeyboardInterrupt is silenced and raised again in the main thread's ordinary code, and every commit of
outputs (`genir_jax.base.io`, checkpoint saves) calls `raise_if_interrupted` first, so an interrupted run
never commits anything, whichever exception handler swallowed its KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

_interrupted = False
_watching = 0  # > 0 inside `console_interrupts`: only there does a recorded interrupt stop commits


def note_interrupt() -> None:
    """Record an interrupt (a SIGINT handler calls this before anything else)."""
    global _interrupted
    _interrupted = True


def clear_interrupt() -> None:
    """Forget a recorded interrupt (a new command in the same process starts afresh)."""
    global _interrupted
    _interrupted = False


def raise_if_interrupted() -> None:
    """KeyboardInterrupt when an interrupt was recorded under `console_interrupts`: call before committing
    outputs. (A library user's interrupt, in a notebook say, does not block the session's later commits.)"""
    if _interrupted and _watching:
        raise KeyboardInterrupt


def record_only(signum, frame) -> None:
    """A SIGINT handler that only records (for the moments before a command can honour an interrupt)."""
    note_interrupt()


def record_and_raise(signum, frame) -> None:
    """The SIGINT handler of `console_interrupts`: record, then raise KeyboardInterrupt."""
    note_interrupt()
    raise KeyboardInterrupt


_in_hook = 0  # > 0 while the main thread is inside the unraisable hook below


def _redeliver() -> None:
    """Raise KeyboardInterrupt in the main thread again once it has left the hook (from a helper thread: in
    the hook, or in the gc pass or ``__del__`` it reports on, it would be dropped again)."""
    import _thread
    import time

    def later() -> None:
        while _in_hook:
            time.sleep(0.01)
        _thread.interrupt_main(signal.SIGINT)

    threading.Thread(target=later, name="genir-jax-interrupt", daemon=True).start()


def _unraisable(previous):
    def hook(unraisable) -> None:
        global _in_hook
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _interrupted and _watching:
            _in_hook += 1
            try:
                _redeliver()
            except KeyboardInterrupt:  # a second Ctrl-C meanwhile: the flag holds it
                pass
            finally:
                _in_hook -= 1
            return
        previous(unraisable)

    return hook


@contextlib.contextmanager
def console_interrupts() -> Iterator[None]:
    """Run the block with SIGINT recorded and raised (`record_and_raise`) and KeyboardInterrupts that an
    "Exception ignored" context would drop raised again. Restores the previous handler and
    `sys.unraisablehook` afterwards, unless another hook was installed on top of ours meanwhile (the
    checkpoint reader's filter for a failed restore's late errors, say): that one stays, and ours, left
    beneath it, passes everything through once no block watches. Outside the main thread it changes nothing."""
    global _watching
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, record_and_raise)
    previous_hook = sys.unraisablehook
    ours = sys.unraisablehook = _unraisable(previous_hook)
    _watching += 1
    try:
        yield
    finally:
        _watching -= 1
        if sys.unraisablehook is ours:
            sys.unraisablehook = previous_hook
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
