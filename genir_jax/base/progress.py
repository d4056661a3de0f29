"""Progress bars of jitted loops: a tqdm bar that says "(compiling)" until its first step is done.

The first step of a loop over batches compiles its program with XLA, which can take a minute with nothing
moving on the screen; `compiling_bar` names that wait, and drops the note at the first update.
"""

from __future__ import annotations

from tqdm.auto import tqdm

COMPILING = " (compiling)"


class compiling_bar(tqdm):  # noqa: N801 - used like tqdm, as a drop-in replacement
    """tqdm (same arguments) whose description reads ``<desc> (compiling)`` until the first step completes."""

    def __init__(self, *args, desc: str = "", **options):
        self._named = desc
        super().__init__(*args, desc=desc + COMPILING, **options)

    def update(self, n: float | None = 1):
        if self._named is not None:  # the first update: compilation is over
            self.set_description_str(self._named, refresh=False)
            self._named = None
        return super().update(n)
