"""The errors a user can cause and fix: bad data, flags, workdirs, checkpoints, numerics.

Every one derives from `UserError`, which the command-line entry points
(`experiments.common.run`) report as one line with exit status 1; any other
exception is a bug in the library and keeps its traceback. Each also derives
from the built-in exception that best describes it, so that `except ValueError`
and the like keep working.
"""


class UserError(Exception):
    """A problem with the user's input or files; the message names it and the fix."""


class DataError(UserError, ValueError):
    """A dataset is missing, unknown, unsafe, or holds arrays of the wrong shape, dtype or range."""


class ConfigError(UserError, ValueError):
    """Settings that cannot work together or with the data (e.g. a batch larger than the data)."""


class WorkdirError(UserError, OSError):
    """The workdir cannot be used: not a directory, not writable, or in use by another run."""


class CheckpointError(UserError, RuntimeError):
    """A workdir's checkpoint cannot be used: corrupted, or from another model or config."""


class RecordError(CheckpointError):
    """A run's record (config.json, metrics.csv, summary.json, a checkpoint's record) is
    unreadable, malformed, or contradicts the others; nothing was changed."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss; the last good state is checkpointed."""
