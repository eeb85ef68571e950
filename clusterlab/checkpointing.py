"""Checkpoints that a kill cannot corrupt.

Lightning's own save writes the file in place (or through a temporary file on another file system,
then copies it over), so a kill at the wrong moment can leave a truncated last.ckpt, the only one a
resume looks at. `AtomicCheckpointIO` writes the new checkpoint beside the old one, flushes it to
disk, then renames it over the old one: at any moment the file is the old checkpoint or the new one.
The CLI uses it for every run (`trainer.plugins`). It also reads every checkpoint weights-only,
whatever Lightning or a torch version would default to: a pickle that names a function would run it.

`EpochRowFirst` keeps the log as safe: an epoch's epoch-end row is in metrics.csv before the
checkpoint that ends the epoch is written, so a kill between the two cannot lose the row.
"""

from __future__ import annotations

import contextlib
import errno
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.trainer.states import RunningStage

from clusterlab.errors import OutputError


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `.<name>.<pid>.tmp` in the target's directory, fsync, `os.replace` onto the target;
    torch.load with `weights_only=True`."""

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None):
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        from clusterlab.runs import load_checkpoint

        return load_checkpoint(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # a remote file system: Lightning's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # inside: a file in its place is reported too
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except (OSError, RuntimeError) as error:  # torch's writer reports a full disk as a RuntimeError
            remedy = "free some space" if _out_of_space(error) else "mend that"
            kept = (
                f"the previous {path.name} is kept: {remedy}, then continue with --ckpt_path last"
                if path.is_file()
                else f"no checkpoint was kept: {remedy} (or pass another --runs_dir) and start again"
            )
            raise OutputError(f"cannot write the checkpoint {path}: {_reason(error, path)}; {kept}") from None
        finally:
            with contextlib.suppress(OSError):  # not there, or its folder never was
                temporary.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)


def _out_of_space(error: Exception) -> bool:
    """A full disk, a quota or a file-size limit; torch's writer reports these as a RuntimeError
    without an errno."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return True


def _reason(error: Exception, path: Path) -> str:
    if isinstance(error, OSError) and error.strerror:
        # "No space left on device", "Disk quota exceeded", "File too large"; with the path where
        # it is a folder above the checkpoint ("File exists: runs/x/checkpoints", a file in its place)
        where = Path(error.filename) if error.filename else None
        above = where is not None and where != path and where.parent != path.parent
        return f"{error.strerror}: {where}" if above else error.strerror
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class EpochRowFirst(Callback):
    """Logs the epoch's epoch-end values (those logged with `on_epoch=True`) on the way into the
    checkpoint that ends the epoch, before the file is written.

    Lightning writes that checkpoint in the callbacks' `on_train_epoch_end` and sends the epoch's
    reduced values to the loggers only afterwards (`FitLoop.on_advance_end`). A SIGKILL in between
    left a checkpoint of the whole epoch, from which a resume starts the next epoch, and a
    metrics.csv without the epoch's row, which nothing logged again. Here the loop's own epoch-end
    logging runs first (the same values at the same step, each logger's `save` writing them out);
    when the loop gets to it, nothing is left to log. It runs on every rank, as the loop's does:
    a value logged with `sync_dist` is reduced across the ranks here.
    """

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        connector, progress = trainer._logger_connector, trainer.fit_loop.epoch_progress.current
        at_epoch_end = (
            trainer.state.stage == RunningStage.TRAINING
            and progress.processed > progress.completed  # the epoch's batches are done, its end is not
            and connector._first_loop_iter is None  # no batch since (not a checkpoint inside an epoch)
        )
        if not at_epoch_end:
            return
        connector.on_epoch_end()
        epoch_loop = trainer.fit_loop.epoch_loop
        epoch_loop._batches_that_stepped -= 1  # as the loop: the epoch's row carries its last step
        try:
            connector.update_train_epoch_metrics()  # logs, saves the loggers, resets the epoch's values
        finally:
            epoch_loop._batches_that_stepped += 1


def timed_last_checkpoint(dirpath: Path, minutes: float) -> ModelCheckpoint:
    """A second writer of last.ckpt, every `minutes` inside an epoch (`--checkpoint_every_minutes`):
    Lightning's time and epoch triggers exclude each other within one ModelCheckpoint."""
    return ModelCheckpoint(
        dirpath=dirpath,
        filename="last",
        save_top_k=1,
        enable_version_counter=False,
        train_time_interval=timedelta(minutes=minutes),
        save_on_train_epoch_end=True,
    )
