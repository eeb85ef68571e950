"""The momentum encoder's update: theta~ <- m theta~ + (1 - m) theta after every optimizer step.

The one schedule of the one moving average (`clusterlab.nn.ema.ema_update_`): SCL's momentum
encoder, SimCLR's MoCo key encoder and DCCM's target network (`target_momentum`) all move through it.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import pytorch_lightning as pl
from torch import nn

from clusterlab.contracts import require
from clusterlab.nn.ema import ema_update_


@runtime_checkable
class HasMomentumEncoder(Protocol):
    """A method with a moving average of some of its submodules.

    `momentum_encoder` maps the name of each averaged submodule of the method (e.g. "backbone",
    "projections") to its copy, with `requires_grad` off. The copies are submodules of the method,
    so they are in the checkpoint."""

    momentum_encoder: nn.ModuleDict


class MomentumEncoder(pl.Callback):
    """Exponential moving average of the encoder, once per optimizer step (MoCo; scl-paper Sec. 3.2).

    With gradient accumulation, several training batches make one optimizer step; the average
    moves once per step, never per batch (the step counter tells which batches stepped).

    Args:
        momentum: m (0.9 in the SCL paper, 0.999 in MoCo).
        final_momentum: None: m stays constant. A value: m rises from `momentum` to it along a
            half cosine over the training's optimizer steps (BYOL's schedule).
        copy_buffers: also copy the online submodules' buffers (BatchNorm statistics) into the
            copies after each step, as MoCo's key encoder does; SCL's copies keep their own.
    """

    def __init__(
        self, momentum: float = 0.9, final_momentum: float | None = None, copy_buffers: bool = False
    ) -> None:
        for name, value in (("momentum", momentum), ("final_momentum", final_momentum)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {value}")
        self.momentum, self.final_momentum, self.copy_buffers = momentum, final_momentum, copy_buffers
        self._steps_before_batch, self._total_steps = -1, math.inf

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require(pl_module, HasMomentumEncoder, self)
        for name in pl_module.momentum_encoder:
            if not isinstance(getattr(pl_module, name, None), nn.Module):
                raise TypeError(
                    f"momentum_encoder.{name} copies {type(pl_module).__name__}.{name}, which is not a "
                    "submodule"
                )

    def momentum_at(self, step: int, total_steps: float) -> float:
        """m after `step` optimizer steps of `total_steps`."""
        if self.final_momentum is None or not math.isfinite(total_steps) or total_steps <= 0:
            return self.momentum
        progress = min(step / total_steps, 1.0)
        return (
            self.final_momentum
            - (self.final_momentum - self.momentum) * (math.cos(math.pi * progress) + 1) / 2
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._total_steps = trainer.estimated_stepping_batches

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        self._steps_before_batch = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step == self._steps_before_batch:
            return  # an accumulating batch: the optimizer has not stepped
        m = self.momentum_at(trainer.global_step - 1, self._total_steps)
        for name, average in pl_module.momentum_encoder.items():
            ema_update_(average, getattr(pl_module, name), m, copy_buffers=self.copy_buffers)
