"""The output folder: built aside, swapped in whole at the end.

A run writes into a hidden sibling `.<out>.partial-XXXX` and, once everything is written, renames
it to `<out>` (the previous output, if any, is renamed away first and then deleted). A run that
fails or is interrupted removes its partial folder, so `<out>` is always a complete output or
the previous one, never a mix of two runs. An existing `<out>` is only replaced when it is a
previous output (it has `cluster.json`) or empty: a folder of other files is refused, untouched.

A run killed with SIGKILL (or by a power cut) cannot remove its partial folder. Each partial
folder names its process (`.owner`: host and PID), and the next run into the same `<out>` removes
the partial folders whose process on this host no longer exists; a run still going keeps its own.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

from clusterlab.errors import OutputError

MARKER = "cluster.json"  # written last into every output: what a re-run may replace
OWNER = ".owner"  # in a partial folder: "<host> <pid>" of the run building it


def check_output(out: Path, folder: Path) -> None:
    """Refuse an --out that would lose data: inside the image folder, holding it, a file, or a
    folder of other files."""
    if out == folder or folder in out.parents:
        raise OutputError(
            f"--out {out} is inside the image folder {folder}: a second run would group its own thumbnails. "
            "Pass a folder outside it."
        )
    if out in folder.parents:
        raise OutputError(
            f"--out {out} holds the image folder {folder}; pass another folder (it would be replaced)."
        )
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; pass a folder (it is created when missing).")
    if out.is_dir() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise OutputError(
            f"--out {out} already holds files that `clusterlab cluster` did not write; nothing was changed. "
            "Pass a new or empty folder."
        )


def make_staging(out: Path) -> Path:
    """The hidden sibling the run builds in; an unwritable place is one OutputError."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        (staging / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    except OSError as error:
        raise OutputError(
            f"cannot write --out {out}: {error.strerror or error}. Pass a folder you can write to."
        ) from None
    return staging


def remove_abandoned(out: Path) -> None:
    """Remove the partial folders of `out` left by runs on this host that no longer exist."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        try:
            host, pid = (partial / OWNER).read_text().split()
        except (OSError, ValueError):
            continue  # being created right now, or not ours to judge
        if host == socket.gethostname() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def swap_in(staging: Path, out: Path) -> None:
    """Replace `out` by `staging` (two renames in the same folder)."""
    (staging / OWNER).unlink(missing_ok=True)
    previous = None
    if out.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, previous / out.name)
    os.rename(staging, out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
