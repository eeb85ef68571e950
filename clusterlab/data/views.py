"""View pipelines: random views of a batch, made on the batch's device, per-sample parameters.

A `Views` module takes the uint8 batch as the data module delivers it, already on the training
device, and returns one random float view of every image, each image with its own draw
(kornia.augmentation samples per sample; torchvision's v2 transforms draw once per batch).
`plain()` gives the un-augmented input (resized and normalised the same way) for evaluation.
A method holds the `Views` it needs and calls them as its paper's algorithm says: CC calls one
family twice, NNM a weak and a strong one, DCCM the original and a geometric perturbation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Views(nn.Module):
    """One family of random views.

    Args:
        augmentations: kornia augmentations, applied in order, each with per-sample parameters.
        size: output side in pixels; None keeps the input size.
        mean, std: per-channel normalisation applied last (None: inputs stay in [0, 1]).
    """

    def __init__(
        self,
        augmentations: Sequence[nn.Module] = (),
        size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.augment = K.AugmentationSequential(*augmentations) if augmentations else nn.Identity()
        self.size = size
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.normalize = K.Normalize(torch.tensor(mean), torch.tensor(std)) if mean is not None else nn.Identity()

    def _to_float(self, images: Tensor) -> Tensor:
        return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()

    def _resize(self, images: Tensor) -> Tensor:
        if self.size is None or images.shape[-2:] == (self.size, self.size):
            return images
        return F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                             antialias=images.shape[-1] > self.size)  # fmt: skip

    def forward(self, images: Tensor) -> Tensor:
        """A random view of every image (a fresh draw per image and per call), in float32 even
        under AMP: the network's autocast starts after the views."""
        with torch.autocast(images.device.type, enabled=False):
            return self.normalize(self._resize(self.augment(self._to_float(images))))

    @torch.no_grad()
    def plain(self, images: Tensor) -> Tensor:
        """The image itself, as the network sees it: resized and normalised, not augmented."""
        return self.normalize(self._resize(self._to_float(images)))


class SimCLRViews(Views):
    """SimCLR's family (CC, and NNM's pretext): resized crop, flip, colour jitter, grayscale, blur.

    Args:
        size: output side (32 for CIFAR with the CIFAR stem, 96 for STL-10, 224 for ImageNet).
        crop_scale: area range of RandomResizedCrop (CC: 0.08-1; SCAN/NNM: 0.2-1).
        strength: s of ColorJitter(0.8s, 0.8s, 0.8s, 0.2s); CC uses 0.5 on CIFAR and
            Tiny-ImageNet, 1.0 on STL-10 and the ImageNet subsets. SCAN's (0.4, 0.4, 0.4, 0.1) is 0.5.
        jitter_p, grayscale_p: probabilities of colour jitter (0.8) and grayscale (0.2).
        blur: GaussianBlur (kernel ~10% of the side, sigma 0.1-2, p = 0.5); CC uses it on
            ImageNet-10 and ImageNet-Dogs only.
    """

    def __init__(
        self,
        size: int = 32,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        strength: float = 0.5,
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        s = strength
        augmentations = [
            K.RandomResizedCrop((size, size), scale=crop_scale),
            K.RandomHorizontalFlip(),
            K.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=jitter_p),
            K.RandomGrayscale(p=grayscale_p),
        ]
        if blur:
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
            augmentations.append(K.RandomGaussianBlur((kernel, kernel), sigma=(0.1, 2.0), p=0.5))
        super().__init__(augmentations, size, mean, std)


class SmallImageViews(Views):
    """Views for small grey images (digits 8x8, Fashion-MNIST 28x28), at their native size.

    Small affine warps matter most: on digits, CC reached ACC 0.978 with affine + colour + noise +
    erasing and 0.781 without the affine (shared/design/METHODS.md). Every part can be turned off.

    Args:
        rotation: degrees, +-; translate: pixels, +-; scale: zoom range (affine, p = 1).
        crop_scale: area range of a random resized crop (Fashion-MNIST: 0.5-1); None: no crop.
        flip: horizontal flip (right for clothes, wrong for digits).
        brightness, contrast: jitter strength, applied with probability jitter_p.
        noise_std, noise_p: additive Gaussian noise.
        erasing, erasing_p: area range of one erased rectangle, and its probability.
    """

    def __init__(
        self,
        rotation: float = 15.0,
        translate: float = 1.5,
        scale: tuple[float, float] = (0.9, 1.1),
        crop_scale: tuple[float, float] | None = None,
        flip: bool = False,
        brightness: float = 0.4,
        contrast: float = 0.4,
        jitter_p: float = 0.8,
        noise_std: float = 0.1,
        noise_p: float = 0.5,
        erasing: tuple[float, float] | None = (0.02, 0.15),
        erasing_p: float = 0.5,
        size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        augmentations: list[nn.Module] = []
        if crop_scale is not None:
            if size is None:
                raise ValueError("a random resized crop needs the output size: set size")
            augmentations.append(K.RandomResizedCrop((size, size), scale=crop_scale))
        if rotation or translate or scale != (1.0, 1.0):
            augmentations.append(_PixelAffine(rotation, translate, scale))
        if flip:
            augmentations.append(K.RandomHorizontalFlip())
        if brightness or contrast:
            augmentations.append(K.ColorJitter(brightness=brightness, contrast=contrast, p=jitter_p))
        if noise_std:
            augmentations.append(K.RandomGaussianNoise(std=noise_std, p=noise_p))
        if erasing is not None:
            augmentations.append(K.RandomErasing(scale=erasing, p=erasing_p))
        super().__init__(augmentations, size, mean, std)


class GeometricViews(Views):
    """DCCM's small perturbations x' = G x (dccm-paper Sec. 3.3), with the authors' ranges (their
    Keras ImageDataGenerator): rotation up to 20 degrees, shift up to 18% of the side, zoom
    0.85-1.15 on each axis independently, horizontal flip, and a per-image intensity shift of up
    to 0.1 (Keras' channel_shift_range: one shift for all channels; here clipped to [0, 1]).
    Every part can be turned off.

    Args:
        rotation: degrees, +-.
        shift: fraction of the side, +- (on 8x8 digits, 0.18 is 1.4 px).
        zoom: range of the scale factor, drawn for x and y separately.
        flip: horizontal flip (right for objects and clothes, wrong for digits).
        channel_shift: largest intensity shift, +- (images in [0, 1]).
        fill: what the affine warp fills in: "border" repeats the edge (Keras' "nearest"),
            "zeros", or "reflection".
    """

    def __init__(
        self,
        rotation: float = 20.0,
        shift: float = 0.18,
        zoom: tuple[float, float] = (0.85, 1.15),
        flip: bool = True,
        channel_shift: float = 0.1,
        fill: Literal["border", "zeros", "reflection"] = "border",
        size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        augmentations: list[nn.Module] = []
        if rotation or shift or tuple(zoom) != (1.0, 1.0):
            augmentations.append(K.RandomAffine(degrees=rotation, translate=(shift, shift) if shift else None,
                                                scale=(*zoom, *zoom), padding_mode=fill, p=1.0))  # fmt: skip
        if flip:
            augmentations.append(K.RandomHorizontalFlip())
        if channel_shift:
            augmentations.append(K.RandomBrightness((1.0 - channel_shift, 1.0 + channel_shift), p=1.0))
        super().__init__(augmentations, size, mean, std)


class _PixelAffine(K.RandomAffine):
    """RandomAffine whose translation is given in pixels (kornia takes a fraction of the side,
    which the side of the batch only fixes at call time)."""

    def __init__(self, rotation: float, translate_px: float, scale: tuple[float, float]) -> None:
        super().__init__(degrees=rotation, translate=None, scale=scale, p=1.0)
        self.translate_px = translate_px

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, Tensor]:
        params = super().generate_parameters(batch_shape)
        if self.translate_px:
            shift = (torch.rand_like(params["translations"]) * 2 - 1) * self.translate_px
            params["translations"] = shift
        return params
