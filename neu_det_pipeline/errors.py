"""User-facing errors: one clear line naming the file and the fix, never a traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """An error caused by input or configuration; the CLI prints its message as one line."""


class ConfigError(PipelineError):
    """A config file or command-line override is invalid."""


class DataError(PipelineError):
    """A dataset file is missing, corrupt or inconsistent."""


class MissingStepOutputError(PipelineError):
    """A step's prerequisite output is missing: the message says which step to run first."""
