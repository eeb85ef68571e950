"""The output folder: built aside, swapped in whole at the end, and never a folder of someone else's.

A run writes into a hidden sibling `.<out>.partial-XXXX` and, once everything is written, renames
it to `<out>` (the previous output, if any, is renamed away first and then deleted). A run that
fails or is interrupted removes its partial folder, so `<out>` is always a complete output or
the previous one, never a mix of two runs.

Only what clusterlab wrote is ever replaced. Every output ends with a marker, `.clusterlab-output.json`,
that lists every file and folder the run wrote, with a run id. An existing `<out>` is replaced only
when it is empty or when everything in it is listed by its marker; anything else (a user's notes, a
file that happens to be called like the marker, a file added to the output after the run) is
named in one line and nothing is changed. The check runs before the run starts and again at the
swap: a file that appears in `<out>` while the run is going stops the swap, and the new output is
kept in a visible sibling folder instead.

A run killed with SIGKILL (or by a power cut) cannot remove its partial folder. Each partial
folder names its process (`.owner`: host and PID), and the next run into the same `<out>` removes
the partial folders whose process on this host no longer exists; a run still going keeps its own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

from clusterlab.errors import OutputError

MARKER = ".clusterlab-output.json"  # written last into every output: what a re-run may replace
WRITER = "clusterlab cluster"
OWNER = ".owner"  # in a partial folder: "<host> <pid>" of the run building it


def check_output(out: Path, folder: Path) -> None:
    """Refuse an --out that would lose data: inside the image folder, holding it, a file, or a
    folder with anything that this command did not write."""
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
    foreign = foreign_entry(out)
    if foreign is not None:
        raise OutputError(
            f"--out {out} holds {foreign}, which `clusterlab cluster` did not write; nothing was changed. "
            "Pass a new or empty folder, or an earlier output of this command."
        )


def _entries(folder: Path) -> list[str]:
    """Every file and folder under `folder`, relative, folders with a trailing '/', sorted; links
    are entries, never followed."""
    found = []
    for parent, folders, files in os.walk(folder):
        here = Path(parent).relative_to(folder)
        found += [(here / name).as_posix() + "/" for name in folders]
        found += [(here / name).as_posix() for name in files]
    return sorted(found)


def _listed(out: Path) -> set[str] | None:
    """What the marker in `out` lists, or None when there is no marker of this command there."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != WRITER or not marker.get("run_id"):
        return None
    files = marker.get("files")
    return set(files) if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def foreign_entry(out: Path) -> str | None:
    """The first path in `out` that this command did not write (None when `out` is missing, empty or
    wholly an earlier output: every entry listed by its marker)."""
    if not out.is_dir():
        return None
    entries = _entries(out)
    if not entries:
        return None
    listed = _listed(out)
    for entry in entries:
        if listed is None or (entry not in listed and entry != MARKER):
            return str(out / entry)
    return None


def seal(staging: Path) -> str:
    """Write the marker: a run id and every entry of the finished output. Returns the run id."""
    (staging / OWNER).unlink(missing_ok=True)
    run_id = uuid.uuid4().hex
    marker = {"written_by": WRITER, "run_id": run_id, "files": _entries(staging)}
    (staging / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return run_id


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
    """Seal `staging` and replace `out` by it (two renames in the same folder). When `out` gained
    a file that clusterlab did not write while the run was going, `out` is left as it is and the new
    output is kept beside it, under a visible name given in the error."""
    run_id = seal(staging)
    foreign = foreign_entry(out)
    if foreign is not None:
        kept = out.with_name(f"{out.name}-{run_id[:8]}")
        os.rename(staging, kept)
        raise OutputError(
            f"--out {out} now holds {foreign}, which `clusterlab cluster` did not write (it appeared while "
            f"this run was going); nothing in {out} was changed. This run's output is in {kept}."
        )
    previous = None
    if out.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, previous / out.name)
    os.rename(staging, out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
