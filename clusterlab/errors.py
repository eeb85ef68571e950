"""Errors that are the user's to fix: a path, a file, a config value, a run that diverged.

`clusterlab` reports each of them as one line, `clusterlab: error: <what, where, what to do>`, and
exits with code 1, without a traceback; `--debug` (or CLUSTERLAB_DEBUG=1) shows the traceback.
Anything else is a bug and keeps its traceback. `report_user_error` writes that line;
`disk_full_message` is the line for a full disk, which names what the run folder still holds.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

from clusterlab.console import plain


class UserError(Exception):
    """A problem with what the user asked for or gave; its message says what, where and what to do."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (too few clusters, a checkpoint that does not fit, ...)."""


class OutputError(UserError, OSError):
    """A place the run must write to cannot be written."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the config it is given with."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint written by another method (or not by clusterlab) was given to this one."""


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


def user_error_behind(error: BaseException | None) -> UserError | None:
    """The UserError that `error` is, or that it was raised from or while handling, or None:
    jsonargparse wraps what a class's constructor raised in a ValueError of its own."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
            return error
        error = error.__cause__ or error.__context__
    return None


def disk_full_message(error: OSError, run_dir: Path | None) -> str:
    """What a full disk stopped, and what the run folder (`run_dir`, None before a run was decided)
    still holds to continue from."""
    where = f" writing {error.filename}" if error.filename else ""
    if run_dir is None:
        return f"{error.strerror}{where}; nothing of a run was written yet"
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        kept = (
            f"{run_dir} keeps {last}; free some space, then continue with: clusterlab fit --config "
            f"{run_dir / 'config.yaml'} --ckpt_path last"
        )
    else:  # a fit's folder without a checkpoint is removed on the way out (ClusterLabCLI.fit)
        kept = (
            f"{run_dir} held no checkpoint yet; free some space (or pass another --runs_dir) and start again"
        )
    return f"{error.strerror}{where}; {kept}"


def report_user_error(error: UserError) -> None:
    """The one line a user error is shown as, on stderr; a rank other than 0 says which it is."""
    from clusterlab.distributed import rank  # torch: only when there is an error to show

    where = f" (rank {rank()})" if rank() else ""
    sys.stderr.write(plain(f"clusterlab: error{where}: {error}\n"))
    sys.stderr.flush()
