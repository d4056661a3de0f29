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


class SettingError(GenIRError, ValueError):
    """A setting of a library call has a bad value. The message names the setting through placeholders
    ``{0}``, ``{1}``, ... so a front end can show its own spelling of it (`renamed`: a CLI's flags)."""

    def __init__(self, template: str, *settings: str):
        self.template, self.settings = template, tuple(settings)
        super().__init__(_fill(template, self.settings))

    def renamed(self, names: dict[str, str]) -> "SettingError":
        """The same error naming each setting as `names` spells it (settings not in `names` keep their name)."""
        return SettingError(self.template, *(names.get(setting, setting) for setting in self.settings))


def _fill(template: str, names: tuple[str, ...]) -> str:
    for index, name in enumerate(names):  # str.replace, not str.format: values in the template may hold braces
        template = template.replace("{%d}" % index, name)
    return template



class MissingDataError(SettingError, DataError):
    """A raw data file is missing; the message names the settings that fix it (the download switch, the data
    directory), so each front end can spell them as its own options."""


def renaming_settings(names: dict[str, str]):
    """Context manager re-raising a `SettingError` under the spelling `names` gives its settings (a command's
    setting -> flag mapping)."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        try:
            yield
        except SettingError as error:
            raise error.renamed(names) from None

    return scope()
