"""The momentum encoder's update: theta~ <- m theta~ + (1 - m) theta after every optimizer step."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch


class MomentumEncoder(pl.Callback):
    """Exponential moving average of the encoder, once per optimizer step (MoCo; scl-paper Sec. 3.2).

    Contract with the method: `pl_module.momentum_encoder` is an `nn.ModuleDict` whose entries are
    copies of the method's same-named submodules (e.g. "backbone", "projections"), with
    `requires_grad` off. The copies are the method's submodules, so they are in the checkpoint.

    With gradient accumulation, several training batches make one optimizer step; the average
    moves once per step, never per batch (the step counter tells which batches stepped).

    Args:
        momentum: m (0.9 in the SCL paper, 0.999 in MoCo).
        final_momentum: None: m stays constant. A value: m rises from `momentum` to it along a
            half cosine over the training's optimizer steps (BYOL's schedule).
    """

    def __init__(self, momentum: float = 0.9, final_momentum: float | None = None) -> None:
        for name, value in (("momentum", momentum), ("final_momentum", final_momentum)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {value}")
        self.momentum, self.final_momentum = momentum, final_momentum
        self._steps_before_batch, self._total_steps = -1, math.inf

    def momentum_at(self, step: int, total_steps: float) -> float:
        """m after `step` optimizer steps of `total_steps`."""
        if self.final_momentum is None or not math.isfinite(total_steps) or total_steps <= 0:
            return self.momentum
        progress = min(step / total_steps, 1.0)
        return self.final_momentum - (self.final_momentum - self.momentum) * (math.cos(math.pi * progress) + 1) / 2

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._total_steps = trainer.estimated_stepping_batches

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._steps_before_batch = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:  # fmt: skip
        if trainer.global_step == self._steps_before_batch:
            return  # an accumulating batch: the optimizer has not stepped
        m = self.momentum_at(trainer.global_step - 1, self._total_steps)
        for name, target in pl_module.momentum_encoder.items():
            online = dict(getattr(pl_module, name).named_parameters())
            names = [n for n, _ in target.named_parameters()]
            if names != list(online):
                raise RuntimeError(f"momentum_encoder.{name} does not mirror {name}: {names} vs {list(online)}")
            torch._foreach_lerp_(list(target.parameters()), [online[n].detach() for n in names], 1.0 - m)
