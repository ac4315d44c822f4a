"""The ways a run ends early, each with the exit code train.main gives it."""

from __future__ import annotations


class UsageError(Exception):
    """Something the user can fix (a config, a path, a checkpoint); exit code 2, one line."""


class CheckpointWriteError(UsageError):
    """A checkpoint could not be written (disk full, ...); orbax's background writes may still
    be failing, so the process ends without tearing them down (which only adds tracebacks)."""


class Interrupted(Exception):
    """The run stopped on request after writing a checkpoint; exit code 130."""


class NonFiniteLoss(Exception):
    """Training losses stayed non-finite past the patience; exit code 3."""
