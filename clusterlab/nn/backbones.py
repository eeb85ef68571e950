"""Backbones: x -> feature vector (B x out_dim). Every backbone says its `out_dim`.

Every backbone also names one intermediate *shallow feature map* M, for the methods that relate
deep and shallow features (DCCM's triplet mutual information, after Deep InfoMax's local
objective): its `shallow` attribute names the layer whose output M is, `shallow_dim` gives M's
channels, and `backbone(x, with_shallow=True)` returns (features, M) from one forward pass.
A method never indexes into a backbone's layers itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torchvision
from torch import Tensor, nn

from clusterlab.errors import ConfigError

Norm = Literal["batch", "group", "none"]


class ResNet(nn.Module):
    """ResNet-18/34 with a stem for the input size (features: the 512-d global average pool).

    stem="cifar": 3x3 stride-1 conv, no max-pool (32 px). Without it the CIFAR numbers of these
        papers are not reproduced.
    stem="stl": 3x3 stride-1 conv, then the max-pool (96 px).
    stem="imagenet": torchvision's 7x7 stride-2 conv and max-pool (224 px).
    shallow: the stage whose output is the shallow map M. "layer2" (default: 128 channels, 16 x 16
        at 32 px with the CIFAR stem) is the first stage after a downsampling, as in DCCM's own net.
    """

    _stage_channels = {"layer1": 64, "layer2": 128, "layer3": 256}

    def __init__(
        self,
        depth: Literal[18, 34] = 18,
        stem: Literal["cifar", "stl", "imagenet"] = "cifar",
        in_channels: int = 3,
        shallow: Literal["layer1", "layer2", "layer3"] = "layer2",
    ) -> None:
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
        self.shallow, self.shallow_dim = shallow, self._stage_channels[shallow]

    def forward(self, x: Tensor, with_shallow: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if not with_shallow:
            return self.net(x)
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        shallow = None
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(net, name)(x)
            if name == self.shallow:
                shallow = x
        return torch.flatten(net.avgpool(x), 1), shallow


def _norm(kind: str, channels: int, dims: int = 2) -> nn.Module:
    """A normalisation layer for conv maps (dims=2: B x C x H x W) or feature vectors (dims=1: B x C)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
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
        shallow_block: the block (0-based) whose output, after its max-pool if it has one, is the
            shallow map M. None: the first block that downsamples (as in DCCM's own net), or the
            first block if none does.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256),
        downsample: Sequence[bool] = (False, True, False),
        norm: Norm = "batch",
        shallow_block: int | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != len(downsample):
            raise ConfigError(f"widths {list(widths)} and downsample {list(downsample)} differ in length")
        if shallow_block is None:
            shallow_block = next((i for i, pool in enumerate(downsample) if pool), 0)
        if not 0 <= shallow_block < len(widths):
            raise ConfigError(f"shallow_block {shallow_block} is not a block of widths {list(widths)}")
        layers: list[nn.Module] = []
        channels = in_channels
        for block, (width, pool) in enumerate(zip(widths, downsample)):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=norm == "none"),
                _norm(norm, width),
                nn.ReLU(inplace=True),
            ]
            if pool:
                layers.append(nn.MaxPool2d(2))
            if block == shallow_block:
                self._shallow_end = len(layers)  # M is the output of net[: _shallow_end]
            channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_dim = channels
        self.shallow, self.shallow_dim = f"block{shallow_block}", widths[shallow_block]

    def forward(self, x: Tensor, with_shallow: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if not with_shallow:
            return self.net(x)
        shallow = self.net[: self._shallow_end](x)
        return self.net[self._shallow_end :](shallow), shallow


class DCCMNet(nn.Module):
    """DCCM's shallow CIFAR net (the authors' public code), without its last layer.

        conv3x3(in -> 64)-BN-ReLU, conv3x3(64 -> 64)-BN-ReLU, max-pool 2   <- shallow map M
        conv3x3(64 -> 128)-BN-ReLU, max-pool 2
        conv3x3(128 -> 256)-BN-ReLU, average pool
        Linear(256 -> 64)-BN-ReLU                                           <- features (out_dim 64)

    The authors' last layer, Linear(64 -> C)-BN-softmax, is DCCM's cluster head
    (clusterlab.methods.DCCM). With padding=0 (the authors' net) a 32 px image shrinks
    32-30-28-14-12-6-4 and the 4x4 average pool is global, M is 64 x 14 x 14. Here the average pool
    is always global, so the same net takes other sizes: unpadded, anything from 20 px
    (Fashion-MNIST's 28 px: M is 64 x 12 x 12); padding=1 keeps the size through each conv, which
    8x8 digits need (8-8-8-4-4-2-2, M 64 x 4 x 4), since unpadded convs would leave nothing.

    Args:
        in_channels: 3 for colour, 1 for grey images.
        padding: 0 as the authors, 1 for small images.
        norm: "batch" (the authors'), "group" (batch-independent, for the distributed tests on
            CPU) or "none".
    """

    def __init__(self, in_channels: int = 3, padding: Literal[0, 1] = 0, norm: Norm = "batch") -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=padding, bias=norm == "none"),
                _norm(norm, cout),
                nn.ReLU(inplace=True),
            ]

        self.shallow_layers = nn.Sequential(*conv(in_channels, 64), *conv(64, 64), nn.MaxPool2d(2))
        self.deep_layers = nn.Sequential(
            *conv(64, 128), nn.MaxPool2d(2), *conv(128, 256), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Sequential(
            nn.Linear(256, 64, bias=norm == "none"), _norm(norm, 64, dims=1), nn.ReLU(inplace=True)
        )
        self.padding = padding
        self.out_dim = 64
        self.shallow, self.shallow_dim = "shallow_layers", 64

    def forward(self, x: Tensor, with_shallow: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if self.padding == 0 and min(x.shape[-2:]) < 20:
            raise ConfigError(
                f"DCCMNet(padding=0) needs images of at least 20 px; got {tuple(x.shape[-2:])}: "
                f"use padding: 1 for small images"
            )
        shallow = self.shallow_layers(x)
        features = self.fc(self.deep_layers(shallow))
        return (features, shallow) if with_shallow else features
