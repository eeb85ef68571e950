"""Errors that are the user's to fix: a path, a file, a config value, a run that diverged.

`clusterlab` reports each of them as one line, `clusterlab: error: <what, where, what to do>`, and
exits with code 1, without a traceback; `--debug` (or CLUSTERLAB_DEBUG=1) shows the traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem with what the user asked for or gave; its message says what, where and what to do."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (too few clusters, a checkpoint that does not fit, ...)."""


class OutputError(UserError, OSError):
    """A place the run must write to cannot be written."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the config it is given with."""


class DivergenceError(UserError, FloatingPointError):
    """Training diverged: a non-finite loss term or parameter."""


# A write that failed because the place is full: the disk (ENOSPC), the user's quota (EDQUOT), or
# the largest file the process may write (EFBIG: `ulimit -f`, a file system's own limit).
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def disk_full(error: BaseException | None) -> OSError | None:
    """The OSError of a full disk behind `error`, or None. Followed through causes and contexts:
    torch.save reports the failed write as a RuntimeError whose context is the OSError."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return error
        error = error.__cause__ or error.__context__
    return None
