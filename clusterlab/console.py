"""What a user sees of the libraries underneath: their own news and deprecations stay out of it.

Every `clusterlab` command calls `quiet_libraries()` first. It hides the deprecation and future
warnings that Lightning, torch, torchvision, kornia, jsonargparse and wandb raise about each other
(a user of clusterlab can do nothing about them), Lightning's advertisement for its cloud logger and
a few notes that do not apply to how clusterlab uses Lightning. Warnings raised by clusterlab's own
code, and every other warning of the libraries (a real problem with the user's data or setup), are
still shown. `CLUSTERLAB_DEBUG=1` shows everything.

`plain(text)` is what an error line becomes off a terminal: without colour codes, which a log file
or a pipe would show as raw escape sequences.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings

LIBRARIES = (
    r"(pytorch_lightning|lightning_fabric|lightning|torch|torchvision|torchmetrics|kornia|jsonargparse|wandb)"
)

# Notes of the libraries that say nothing about this run: clusterlab sets these up on purpose.
NOT_FOR_US = (
    ".*does not have many workers.*",  # the data live in memory: workers would only copy them
    ".*Sparse invariant checks.*",
    ".*is smaller than the logging interval.*",  # tiny data sets log at their epoch's end
    ".*exists and is not empty.*",  # a resumed run writes into its own directory
    ".*srun.*",  # Lightning's hint to use srun, when a user starts a run on a SLURM login node
    ".*is an instance of `nn.Module` and is already saved.*",  # the config records the backbone
)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class _DropTips(logging.Filter):
    """Lightning's logger says "💡 Tip: ..." about products on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def quiet_libraries() -> None:
    if os.environ.get("CLUSTERLAB_DEBUG", "") not in ("", "0"):
        return
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES + r"(\.|$)")
    for message in NOT_FOR_US:
        warnings.filterwarnings("ignore", message=message)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def plain(text: str, stream=None) -> str:
    """`text` without terminal colour codes, unless `stream` (default stderr) is a terminal."""
    stream = stream or sys.stderr
    return text if getattr(stream, "isatty", lambda: False)() else _ANSI.sub("", text)


class OneLineParser(argparse.ArgumentParser):
    """argparse for clusterlab's own commands: a bad argument is one line (no usage dump) and exit
    code 2, as every clusterlab error is one line."""

    def error(self, message: str):
        sys.stderr.write(plain(f"{self.prog}: error: {message} (see: {self.prog} --help)\n"))
        raise SystemExit(2)
