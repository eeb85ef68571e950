"""Callbacks and configs the CLI tests load by class path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytorch_lightning as pl
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CC on digits, small enough for a test: 8/16-channel CNN, 3 batches of 64 per epoch.
TINY_CC = """
seed_everything: 3
trainer:
  max_epochs: 4
  limit_train_batches: 3
  check_val_every_n_epoch: 1
  num_sanity_val_steps: 0
  enable_model_summary: false
  logger:
  - class_path: clusterlab.loggers.CSVLogger
model:
  class_path: clusterlab.methods.CC
  init_args:
    backbone:
      class_path: clusterlab.nn.SmallCNN
      init_args: {in_channels: 1, widths: [8, 16], downsample: [false, true]}
    views:
      class_path: clusterlab.data.views.SmallImageViews
    optimizer:
      class_path: torch.optim.Adam
      init_args: {lr: 0.001}
data:
  dataset: digits
  batch_size: 64
kmeans_baseline: false
figures:
  embedding_points: 300
"""


class KillAt(pl.Callback):
    """SIGKILLs its own process at a given batch: a crash that flushes nothing."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


# SimCLR then NNM on digits, small enough for a test (the NNM config names the SimCLR run's checkpoint).
TINY_SIMCLR = """
seed_everything: 3
trainer:
  max_epochs: 1
  limit_train_batches: 2
  num_sanity_val_steps: 0
  enable_model_summary: false
  logger: false
model:
  class_path: clusterlab.methods.SimCLR
  init_args:
    backbone:
      class_path: clusterlab.nn.SmallCNN
      init_args: {in_channels: 1, widths: [8, 16], downsample: [false, true]}
    views:
      class_path: clusterlab.data.views.SmallImageViews
data:
  dataset: digits
  batch_size: 64
kmeans_baseline: false
"""

TINY_NNM = """
seed_everything: 3
trainer:
  max_epochs: 4
  limit_train_batches: 3
  check_val_every_n_epoch: 1
  num_sanity_val_steps: 0
  enable_model_summary: false
  logger: false
model:
  class_path: clusterlab.methods.NNM
  init_args:
    pretext_checkpoint: runs/tiny_simclr/*-seed{seed}/checkpoints/last.ckpt
    backbone:
      class_path: clusterlab.nn.SmallCNN
      init_args: {in_channels: 1, widths: [8, 16], downsample: [false, true]}
    views:
      class_path: clusterlab.data.views.StrongViews
      init_args: {flip: false, ops: {identity: null, rotate: [0, 20], contrast: null}, cutout_fill: 0.0}
    optimizer:
      class_path: torch.optim.Adam
      init_args: {lr: 0.001}
data:
  dataset: digits
  batch_size: 64
kmeans_baseline: false
"""


def save_pretext(model, path) -> str:
    """A SimCLR model saved as a clusterlab checkpoint, without training it (what NNM loads)."""
    import torch

    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return str(path)


def clusterlab(*args, cwd):
    """`python -m clusterlab ...` in a fresh process (a SIGKILL there does not end the tests)."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "clusterlab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def state(run_dir):
    return torch.load(next(run_dir.glob("*/checkpoints/last.ckpt")), weights_only=False)


def kill_and_resume(folder, config: str) -> tuple[dict, dict, dict]:
    """Fits `config` (4 epochs of 3 batches) whole as run "whole"; then as run "killed", SIGKILLed in
    epoch 2 at batch 1 and continued with `--ckpt_path last`. Returns the last checkpoints of the
    whole run, of the killed run as it was at the kill, and of the resumed run; asserts that both
    ended at the same place and that every tensor of the state dict is equal."""
    kill = ["--trainer.callbacks+=tests.helpers.KillAt", "--trainer.callbacks.epoch=2", "--trainer.callbacks.batch=1"]
    whole = clusterlab("fit", "--config", config, "--name", "whole", cwd=folder)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = clusterlab("fit", "--config", config, "--name", "killed", *kill, cwd=folder)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL, mid-epoch 2
    at_kill = state(folder / "runs" / "killed")
    assert at_kill["epoch"] == 1  # the last checkpoint is epoch 1's
    resumed = clusterlab("fit", "--config", config, "--name", "killed", "--ckpt_path", "last", cwd=folder)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = state(folder / "runs" / "whole"), state(folder / "runs" / "killed")
    assert got["epoch"] == expected["epoch"] == 3 and got["global_step"] == expected["global_step"] == 12
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name
    return expected, at_kill, got
