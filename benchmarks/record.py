"""How the benchmark scripts record a result: the command as typed, the machine it ran on, the report.

Every results file says both (tests/test_results_files.py): a markdown report opens with the command
in a code block and a "Machine: ..." line; a JSON record has "command" and "machine" keys. The
scripts import this module the way they import each other, with benchmarks/ on sys.path.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed: "python " and sys.argv (or `argv`, the script's path first), quoted."""
    return "python " + shlex.join(sys.argv if argv is None else argv)


def machine(*details: str) -> str:
    """The architecture and CPU cores, then the script's own details (torch version, threads, GPU...)."""
    return ", ".join([platform.machine(), f"{os.cpu_count()} CPU cores", *details])


def machine_line(*details: str) -> str:
    """One "Machine: ..." line of a markdown report (see `machine`)."""
    return "Machine: " + machine(*details)


def gpu() -> str:
    """The first CUDA device's name, or "no GPU"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def write_report(text: str, out: str | Path | None) -> None:
    """Write the report to `out` (making its folder) when one is given, then print it (written
    first, so that a closed stdout cannot lose the record)."""
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)
