"""Callbacks and configs the CLI tests load by class path."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl

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
