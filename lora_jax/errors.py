"""Errors a user can act on: a bad config value, a workdir that holds another run, a run that
diverged or was preempted, a damaged file.

Each subclasses `RunError`, so the command-line entry points print the message alone (no
traceback: the message says what is wrong and what would be right) and exit with `exit_code`.
Anything else is a bug and keeps its traceback. Where a built-in exception type fits, the class
also derives from it, so `except ValueError` keeps working for callers of the Python API.
"""

from __future__ import annotations


class RunError(Exception):
    """A run cannot start or go on, for a reason the message names."""

    exit_code = 1


class ConfigError(RunError, ValueError):
    """A config field holds a value that is not allowed (the message names field and value)."""


class WorkdirError(RunError):
    """The workdir holds another run, another run's inputs, or a live trainer."""


class IncompatibleCheckpoint(WorkdirError, ValueError):
    """A readable checkpoint whose tree, shapes or dtypes differ from the run's state."""


class DivergenceError(RunError, RuntimeError):
    """The loss or the trainable parameters became non-finite."""


class Preempted(RunError):
    """SIGTERM arrived; the current step was checkpointed. Rerunning resumes from it."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class FileFormatError(RunError, ValueError):
    """A file exists but cannot be read as what it should be (the message names the file)."""


class OtherBase(RunError, ValueError):
    """Trained adapters loaded on another base than they were trained on (the message names
    both, by their checkpoint files' fingerprints)."""
