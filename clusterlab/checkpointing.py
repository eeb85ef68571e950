"""Checkpoints that a kill cannot corrupt.

Lightning's own save writes the file in place (or through a temporary file on another file system,
then copies it over), so a kill at the wrong moment can leave a truncated last.ckpt, the only one a
resume looks at. `AtomicCheckpointIO` writes the new checkpoint beside the old one, flushes it to
disk, then renames it over the old one: at any moment the file is the old checkpoint or the new one.
The CLI uses it for every run (`trainer.plugins`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to `.<name>.<pid>.tmp` in the target's directory, fsync, `os.replace` onto the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # a remote file system: Lightning's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
