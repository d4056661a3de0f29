"""Exceptions raised for bad user input.

Every error names the file (or hub id), the record / tensor / field and what was expected, so a user can
fix the input without reading our code. The CLI maps these to exit code 2.
"""

from __future__ import annotations


class GenIRError(Exception):
    """Base class of the errors genir-jax raises for bad input (never for internal bugs)."""


class ConfigError(GenIRError, ValueError):
    """A model configuration (usually a `config.json`) is invalid or unsupported."""


class CheckpointError(GenIRError, ValueError):
    """A checkpoint directory or weight file is missing, corrupt or contradicts its configuration."""


class DataError(GenIRError, ValueError):
    """A data file (documents, queries, qrels, run file, raw corpus) is malformed or inconsistent."""
