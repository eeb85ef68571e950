"""Backbones: x -> feature vector (B x out_dim). Every backbone says its `out_dim`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torchvision
from torch import Tensor, nn


class ResNet(nn.Module):
    """ResNet-18/34 with a stem for the input size (features: the 512-d global average pool).

    stem="cifar": 3x3 stride-1 conv, no max-pool (32 px). Without it the CIFAR numbers of these
        papers are not reproduced.
    stem="stl": 3x3 stride-1 conv, then the max-pool (96 px).
    stem="imagenet": torchvision's 7x7 stride-2 conv and max-pool (224 px).
    """

    def __init__(self, depth: Literal[18, 34] = 18, stem: Literal["cifar", "stl", "imagenet"] = "cifar",
                 in_channels: int = 3) -> None:  # fmt: skip
        super().__init__()
        net = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34}[depth](weights=None)
        if stem in ("cifar", "stl") or in_channels != 3:
            kernel, stride = (3, 1) if stem != "imagenet" else (7, 2)
            net.conv1 = nn.Conv2d(in_channels, 64, kernel, stride, kernel // 2, bias=False)
        if stem == "cifar":
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.net = net
        self.out_dim = 512

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4), channels)
    return nn.Identity()


class SmallCNN(nn.Module):
    """A small VGG-style CNN for CPU-sized runs (digits, Fashion-MNIST).

    One block per entry of `widths`: conv3x3 - norm - ReLU, then a 2x2 max-pool where
    `downsample` says so; global average pool at the end.

    Args:
        in_channels: 1 for grey images, 3 for colour.
        widths: output channels of each block.
        downsample: per block, whether a max-pool follows it.
        norm: "batch" (default), "group" (batch-independent: the same per-sample output on any
            number of processes, used by the distributed tests on CPU, where torch has no
            SyncBatchNorm) or "none".
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256),
        downsample: Sequence[bool] = (False, True, False),
        norm: Literal["batch", "group", "none"] = "batch",
    ) -> None:
        super().__init__()
        if len(widths) != len(downsample):
            raise ValueError(f"widths {list(widths)} and downsample {list(downsample)} differ in length")
        layers: list[nn.Module] = []
        channels = in_channels
        for width, pool in zip(widths, downsample):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=norm == "none"), _norm(norm, width),
                       nn.ReLU(inplace=True)]  # fmt: skip
            if pool:
                layers.append(nn.MaxPool2d(2))
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_dim = channels

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
