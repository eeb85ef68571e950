"""Fast defaults for the device a run trains on: memory layout, cuDNN autotuning, TF32, compile.

None of these changes what is computed, only how: channels_last and TF32 change floating-point
rounding (TF32: matmuls and convs in 10-bit-mantissa inputs, float32 sums), compile fuses kernels.
They are set before the model moves to its device (`setup`), on every process of a run.

On the CPU, channels_last changes nothing in float32 and speeds up a ResNet-18 step in bf16-mixed
(oneDNN reorders NCHW tensors for every bf16 convolution otherwise), so "auto" turns it on for a
GPU, or for the CPU under a bf16 precision; float32 CPU runs keep the layout they were recorded
with (figures: docs/results.md, "Measurements behind design choices").
"""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as pl
import torch
from torch import nn


class Speed(pl.Callback):
    """How the run's kernels execute (the CLI adds it to every run: `--speed.<name>`).

    Args:
        channels_last: "auto": NHWC tensors for the method's convolutions on a GPU, and on a CPU
            under bf16 precision; True / False: always / never.
        cudnn_benchmark: let cuDNN time its algorithms for each input shape once and keep the fastest
            (the training batches have one shape: the loaders drop the last, short batch).
        matmul_precision: torch.set_float32_matmul_precision on a GPU: "high" uses TF32 tensor cores
            for float32 matmuls (Ampere and later), "highest" keeps full float32.
        compile: torch.compile the backbone in place (its parameter names, so its checkpoints, stay
            the same). The first steps are slower while it compiles.
    """

    def __init__(
        self,
        channels_last: Literal["auto"] | bool = "auto",
        cudnn_benchmark: bool = True,
        matmul_precision: Literal["highest", "high", "medium"] = "high",
        compile: bool = False,
    ) -> None:
        self.channels_last, self.cudnn_benchmark = channels_last, cudnn_benchmark
        self.matmul_precision, self.compile = matmul_precision, compile
        self.applied: dict[str, object] = {}  # what setup did: read by the benchmarks and tests

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.applied:  # once per run (fit, then test, call setup again)
            self.apply(pl_module, trainer.strategy.root_device, str(trainer.precision))

    def apply(self, module: nn.Module, device: torch.device, precision: str) -> dict[str, object]:
        """Set up `module` (before it moves to `device`) and torch for training in `precision`; the
        benchmarks' bare loops call it too, so that both sides of a comparison run alike."""
        on_gpu = device.type == "cuda"
        if on_gpu:
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
            torch.set_float32_matmul_precision(self.matmul_precision)
        convolutional = any(isinstance(m, nn.Conv2d) for m in module.modules())
        channels_last = self.channels_last
        if channels_last == "auto":
            channels_last = on_gpu or "bf16" in precision
        if channels_last and convolutional:
            module.to(memory_format=torch.channels_last)  # 4-d weights only; kept by the move to the device
        if self.compile:
            for backbone in module.backbones():
                backbone.compile()
        self.applied = {
            "device": device.type,
            "channels_last": bool(channels_last and convolutional),
            "cudnn_benchmark": self.cudnn_benchmark if on_gpu else None,
            "matmul_precision": self.matmul_precision if on_gpu else None,
            "compile": self.compile,
        }
        return self.applied
