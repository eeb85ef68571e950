"""clusterlab.checkpointing: last.ckpt is always a whole checkpoint, read weights-only, that a run
resumes from where it was; an epoch's row is in metrics.csv before the checkpoint that ends it.
(Through the CLI: a full disk, tests/hostile/test_config_values.py; a planted pickle,
tests/hostile/test_foreign_code.py; a SIGKILL after an epoch's checkpoint,
tests/hostile/test_resume_inputs.py; kills and resumes, tests/cli/test_resume.py.)"""

from __future__ import annotations

import argparse
import csv
import os
import re
import threading
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from clusterlab.checkpointing import AtomicCheckpointIO, EpochRowFirst, timed_last_checkpoint
from clusterlab.errors import CheckpointError, OutputError
from clusterlab.loggers import CSVLogger


class Linear(pl.LightningModule):
    """One linear layer fitted with Adam (an optimizer with state) on fixed batches; logs its loss
    per step and per epoch. No hyper-parameters: its checkpoints hold nothing pickled."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def batches() -> DataLoader:
    """24 samples in 3 batches, always in the same order."""
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


def fit(folder: Path, epochs: int, ckpt_path=None, callbacks=(), io=None, logger=False) -> Linear:
    """Fit as the CLI does: last.ckpt after every epoch through the checkpoint plugin."""
    torch.manual_seed(0)
    model = Linear()
    every_epoch = ModelCheckpoint(
        dirpath=folder / "checkpoints",
        filename="last",
        save_top_k=1,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[every_epoch, *callbacks],
        plugins=[io or AtomicCheckpointIO()],
        default_root_dir=folder,
    ).fit(model, batches(), ckpt_path=ckpt_path)
    return model


class RecordStart(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.at = (trainer.current_epoch, trainer.global_step)


def test_a_reader_only_ever_sees_the_old_checkpoint_or_the_new_one(tmp_path):
    """Checkpoints written over each other while another process (here a thread) reads last.ckpt:
    every read is a whole checkpoint, never a part of one, and never an older one than before; and
    the file that a reader has open is never written to (each new one is renamed over it)."""
    path = tmp_path / "checkpoints" / "last.ckpt"  # the folder is made on the way
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(1)}, "epoch": -1}, path)
    first = path.read_bytes()
    held = open(path, "rb")  # read after the writes
    reading, done = threading.Event(), threading.Event()

    def write() -> None:
        try:
            reading.wait(timeout=30)
            for epoch in range(30):
                io.save_checkpoint({"state_dict": {"w": torch.full((250_000,), epoch)}, "epoch": epoch}, path)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen = []
    while not seen or not done.is_set():
        checkpoint = io.load_checkpoint(path)  # a part of a file: CheckpointError
        seen.append(checkpoint["epoch"])
        reading.set()
        if checkpoint["epoch"] >= 0:
            assert checkpoint["state_dict"]["w"].eq(checkpoint["epoch"]).all()
    writer.join()
    assert seen == sorted(seen) and seen[0] == -1  # read from before the first replacement on
    assert io.load_checkpoint(path)["epoch"] == 29
    with held:
        assert held.read() == first
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temporary file left


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="pickle"):  # not a full disk: what torch.save raised
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2, "hook": lambda: None}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]


def test_a_checkpoint_folder_that_cannot_be_made_is_one_clear_message(tmp_path):
    """A file where the checkpoints folder should be: not a traceback from mkdir, and not the advice
    for a full disk."""
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(OutputError) as raised:
        AtomicCheckpointIO().save_checkpoint({"epoch": 0}, tmp_path / "checkpoints" / "last.ckpt")
    message = str(raised.value)
    folder = tmp_path / "checkpoints"
    assert message.startswith(f"cannot write the checkpoint {folder}/last.ckpt: File exists: {folder};")
    assert "no checkpoint was kept: mend that (or pass another --runs_dir)" in message
    assert "free some space" not in message


def test_checkpoints_are_read_weights_only_even_when_asked_otherwise(tmp_path):
    """Lightning passes weights_only=False when nothing is set: a pickled object is refused anyway."""
    planted = tmp_path / "planted.ckpt"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, planted)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {re.escape(str(planted))}"):
        AtomicCheckpointIO().load_checkpoint(planted, weights_only=False)


def test_a_run_resumes_from_its_checkpoint_where_it_was_to_the_same_weights(tmp_path):
    """The epoch's checkpoint holds the whole state a resume needs (loops, Adam's moments), weights
    only: a run stopped after epoch 0 and resumed from it ends as the run that was never stopped."""
    whole = fit(tmp_path / "whole", epochs=3)
    fit(tmp_path / "stopped", epochs=1)
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, 3) and saved["optimizer_states"][0]["state"]
    start = RecordStart()
    resumed = fit(tmp_path / "stopped", epochs=3, ckpt_path=last, callbacks=[start])
    assert start.at == (1, 3)  # the next epoch, after the 3 steps of epoch 0
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert torch.load(last, weights_only=True)["global_step"] == 9


class RowsAtEachSave(AtomicCheckpointIO):
    """Saves as the CLI does and records, at each save, (epoch, global step) of the checkpoint and
    the epochs of the epoch-end rows already in metrics.csv."""

    def __init__(self, log: Path) -> None:
        super().__init__()
        self.log, self.saves = log, []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        self.saves.append(((checkpoint["epoch"], checkpoint["global_step"]), epoch_rows(self.log)))


def epoch_rows(log: Path) -> list[int]:
    if not log.is_file():
        return []
    with open(log, newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f) if row.get("train/loss_epoch")]


def test_an_epochs_row_is_logged_before_the_checkpoint_that_ends_the_epoch_and_once(tmp_path):
    """With last.ckpt also written after every batch (timed_last_checkpoint): a checkpoint inside
    an epoch logs no epoch row early, the one that ends the epoch finds its row in the file."""
    io = RowsAtEachSave(tmp_path / "metrics.csv")
    inside_epochs = timed_last_checkpoint(tmp_path / "checkpoints", minutes=0.000001)
    fit(tmp_path, 3, callbacks=[EpochRowFirst(), inside_epochs], io=io, logger=CSVLogger(str(tmp_path)))
    # Epoch e: its steps 3e+1, 3e+2, 3e+3 each end with a checkpoint inside the epoch, before any
    # row of epoch e; then the checkpoint that ends epoch e, with its row already in the file.
    expected = []
    for e in range(3):
        inside = [((e, 3 * e + step), list(range(e))) for step in (1, 2, 3)]
        expected += [*inside, ((e, 3 * e + 3), list(range(e + 1)))]
    assert io.saves == expected
    assert epoch_rows(tmp_path / "metrics.csv") == [0, 1, 2]  # each once
