"""How chatty the libraries under genir-jax are: quiet by default, everything with ``genir-jax -v``.

`set_verbosity` is called once when a command starts (`genir_jax.cli.main`), before any handler imports
transformers or bm25s. Quiet, it hides

- transformers' log lines below errors, among them the advisory ``PyTorch was not found. Models won't be
  available ...`` that it logs while being imported (so it is silenced through the environment variables that
  transformers reads on import: ``TRANSFORMERS_VERBOSITY`` and ``TRANSFORMERS_NO_ADVISORY_WARNINGS``; a user's
  own values win);
- bm25s' debug lines (``Building index from tokens``): bm25s sets its logger to DEBUG when imported, so a filter
  on that logger, which its import does not undo, drops records below warnings.

Verbose, transformers logs at debug level, bm25s' records pass, and the root logger shows debug records (JAX's
among them) on stderr.
"""

from __future__ import annotations

import logging
import os
import sys

# Loggers whose records below WARNING are dropped when quiet.
QUIETED_LOGGERS = ("bm25s",)


class _BelowWarning(logging.Filter):
    """Drops records below WARNING (a logger filter survives the library setting its logger's level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


_QUIET_FILTER = _BelowWarning()


def set_verbosity(verbose: bool = False) -> None:
    """Quiet (the default) or verbose library logging for the rest of the process; see the module docstring."""
    for name in QUIETED_LOGGERS:
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(_QUIET_FILTER)
        else:
            logger.addFilter(_QUIET_FILTER)  # adding it twice keeps one
    if verbose:
        os.environ["TRANSFORMERS_VERBOSITY"] = "debug"
        os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s:%(name)s: %(message)s")
        logging.getLogger().setLevel(logging.DEBUG)
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # imported already (a library caller): its level is set, set it again
        from transformers.utils import logging as transformers_logging

        level = transformers_logging.log_levels.get(os.environ["TRANSFORMERS_VERBOSITY"])
        if level is not None:  # an unknown value of the user's: transformers warns about it itself
            transformers_logging.set_verbosity(level)
