"""How the benchmark scripts record a result: the command as typed, the machine it ran on, the report.

Every results file says both (tests/test_results_files.py): a markdown report opens with the command
in a code block and a "Machine: ..." line; a JSON record has "command" and "machine" keys. The
scripts import this module the way they import each other, with benchmarks/ on sys.path.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The runner's machine description, so that every results file describes a machine the same way.
from clusterlab.benchmark import describe_machine as machine  # noqa: E402
from clusterlab.benchmark import gpu  # noqa: E402, F401 - the scripts import it from here


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed: "python " and sys.argv (or `argv`, the script's path first), quoted."""
    return "python " + shlex.join(sys.argv if argv is None else argv)


def machine_line(*details: str) -> str:
    """One "Machine: ..." line of a markdown report (`machine`: the architecture, the CPU cores, then
    `details`)."""
    return "Machine: " + machine(*details)


def cpu() -> str:
    """The CPU model (as every metrics.json records it) and its bfloat16-related flags."""
    from clusterlab.fit_report import environment

    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    wanted = [f for f in flags if "bf16" in f or f.startswith("amx") or f == "avx512f"]
    return f"{environment()['cpu']}; bf16-related flags: {' '.join(wanted) or 'none'}"


def write_report(text: str, out: str | Path | None) -> None:
    """Write the report to `out` (making its folder) when one is given, then print it (written
    first, so that a closed stdout cannot lose the record)."""
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)
