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

import kornia
import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterlab.errors import ConfigError


class Views(nn.Module):
    """One family of random views.

    Args:
        augmentations: kornia augmentations, applied in order, each with per-sample parameters.
        size: output side in pixels; None keeps the input size.
        mean, std: per-channel normalisation applied last (None: inputs stay in [0, 1]).
        standardize: instead, each image and channel to mean 0 and standard deviation 1
            (`ImageStandardize`), so that colour casts and exposure do not tell images apart.
    """

    def __init__(
        self,
        augmentations: Sequence[nn.Module] = (),
        size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.augment = K.AugmentationSequential(*augmentations) if augmentations else nn.Identity()
        self.size = size
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std, or neither")
        if standardize and mean is not None:
            raise ConfigError("standardize replaces mean and std: give one or the other")
        self.normalize = (
            K.Normalize(torch.tensor(mean), torch.tensor(std)) if mean is not None else nn.Identity()
        )
        if standardize:
            self.normalize = ImageStandardize()

    def _to_float(self, images: Tensor) -> Tensor:
        return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()

    def _resize(self, images: Tensor) -> Tensor:
        if self.size is None or images.shape[-2:] == (self.size, self.size):
            return images
        return F.interpolate(
            images,
            size=(self.size, self.size),
            mode="bilinear",
            align_corners=False,
            antialias=images.shape[-1] > self.size,
        )

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
        standardize: per-image standardisation last (see `Views`; `clusterlab cluster` on photos).
        hue: the hue jitter, a fraction of the colour circle up to 0.5 (None: 0.2 x strength).
        flip: the horizontal flip (SimCLR's; wrong where a mirror image is another kind, as digits).
        shear: degrees, +-, parallel to the x axis, after the crop (0: none, SimCLR's): the slant
            of handwriting and of italic type (`clusterlab cluster` on a folder without flips).
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
        standardize: bool = False,
        hue: float | None = None,
        flip: bool = True,
        shear: float = 0.0,
    ) -> None:
        s = strength
        augmentations: list[nn.Module] = [K.RandomResizedCrop((size, size), scale=crop_scale)]
        if shear:
            augmentations.append(_PixelAffine(0.0, 0.0, (1.0, 1.0), shear))
        if flip:
            augmentations.append(K.RandomHorizontalFlip())
        augmentations += [
            ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s if hue is None else hue, p=jitter_p),
            K.RandomGrayscale(p=grayscale_p),
        ]
        if blur:
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
            augmentations.append(K.RandomGaussianBlur((kernel, kernel), sigma=(0.1, 2.0), p=0.5))
        super().__init__(augmentations, size, mean, std, standardize)


class ColorJitter(K.ColorJitter):
    """kornia's ColorJitter with the same draws and the same arithmetic, without its host reads.

    kornia reads the random order of the four adjustments back to the host (`order.tolist()`) and
    checks each adjustment's factors with a Python `if (factors != neutral).any()` (on grey images
    always: its branch-free path is for RGB only): five waits for the device per call. Here every
    round of the order applies each adjustment that can change anything and keeps the one the order
    names there, selected on the device (`torch.where`). An adjustment whose range is the neutral
    value alone (saturation and hue of `SmallImageViews`) is left out when the module is built,
    which kornia's check does at every call with the same outcome. 4 rounds x the adjustments in
    use: on small images the extra arithmetic costs less than the waits.
    """

    _NEUTRAL = (1.0, 1.0, 1.0, 0.0)
    _FACTORS = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")  # kornia's names

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        ranges = [self.brightness, self.contrast, self.saturation, self.hue]
        self._active = [k for k, r in enumerate(ranges) if not _neutral_range(r, self._NEUTRAL[k], k == 3)]

    def apply_transform(
        self, input: Tensor, params: dict[str, Tensor], flags: dict, transform: Tensor | None = None
    ) -> Tensor:
        if self._fixed_order is not None:  # kornia's own path is sync-free on RGB only
            return super().apply_transform(input, params, flags, transform)
        factors = [params[key] for key in self._FACTORS]
        steps = (self._brightness_fn, self._contrast_fn, self._saturation_fn, self._adjust_hue_turns)
        output = input.clamp(0.0, 1.0)  # as kornia clamps (the views carry no gradient)
        for chosen in params["order"]:  # the adjustments' random order: on the device, never read
            current = output
            for k in self._active:
                output = torch.where(chosen == k, steps[k](current, factors[k]), output)
        return output.clamp(0.0, 1.0)  # a new tensor, as kornia's, even when every step was skipped


def _neutral_range(value, neutral: float, hue: bool) -> bool:
    """Whether kornia's ColorJitter range for `value` holds the neutral factor alone."""
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, (int, float)):
        return value == 0
    low, high = value
    return low == high == neutral


class ImageStandardize(nn.Module):
    """Each image and channel to mean 0 and standard deviation 1 (grey-world white balance with
    exposure and contrast normalisation): a colour cast, a dim or a washed-out photo looks like
    the same photo taken well, so that such casts cannot become clusters. Colour jitter and
    random greyscale vary the colours between two views, but both views of a photo keep most of
    its cast, which stays the easiest way to tell photos apart: without this, SimCLR features of
    a folder with a random cast per image cluster by cast (figures: docs/results.md,
    "Measurements behind design choices"). `eps` (of the [0, 1] range) keeps flat images from
    having their noise blown up."""

    def __init__(self, eps: float = 0.05) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, images: Tensor) -> Tensor:
        mean = images.mean((-2, -1), keepdim=True)
        std = images.std((-2, -1), keepdim=True)
        return (images - mean) / (std + self.eps)


class SmallImageViews(Views):
    """Views for small grey images (digits 8x8, Fashion-MNIST 28x28), at their native size.

    Small affine warps (rotation, translation, zoom, shear) matter most on such images: a digit or a
    garment keeps its class under them while its pixels move, which is what the contrastive views must
    teach. Every part can be turned off.

    Args:
        rotation: degrees, +-; translate: pixels, +-; scale: zoom range (affine, p = 1).
        shear: degrees, +-, parallel to the x axis: the slant of handwriting (0: none).
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
        shear: float = 0.0,
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
                raise ConfigError("a random resized crop needs the output size: set size")
            augmentations.append(K.RandomResizedCrop((size, size), scale=crop_scale))
        if rotation or translate or scale != (1.0, 1.0) or shear:
            augmentations.append(_PixelAffine(rotation, translate, scale, shear))
        if flip:
            augmentations.append(K.RandomHorizontalFlip())
        if brightness or contrast:
            augmentations.append(ColorJitter(brightness=brightness, contrast=contrast, p=jitter_p))
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
        shear: degrees, +-, parallel to the x axis (Keras' shear_range; 0: none, as the authors).
        flip: horizontal flip (right for objects and clothes, wrong for digits).
        channel_shift: largest intensity shift, +- (images in [0, 1]).
        fill: what the affine warp fills in: "border" repeats the edge (Keras' "nearest"),
            "zeros", or "reflection".
        standardize: per-image standardisation last (see `Views`).
    """

    def __init__(
        self,
        rotation: float = 20.0,
        shift: float = 0.18,
        zoom: tuple[float, float] = (0.85, 1.15),
        shear: float = 0.0,
        flip: bool = True,
        channel_shift: float = 0.1,
        fill: Literal["border", "zeros", "reflection"] = "border",
        size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        standardize: bool = False,
    ) -> None:
        augmentations: list[nn.Module] = []
        if rotation or shift or tuple(zoom) != (1.0, 1.0) or shear:
            augmentations.append(
                K.RandomAffine(
                    degrees=rotation,
                    translate=(shift, shift) if shift else None,
                    scale=(*zoom, *zoom),
                    shear=shear or None,  # None, not 0.0: see _PixelAffine
                    padding_mode=fill,
                    p=1.0,
                )
            )
        if flip:
            augmentations.append(K.RandomHorizontalFlip())
        if channel_shift:
            augmentations.append(K.RandomBrightness((1.0 - channel_shift, 1.0 + channel_shift), p=1.0))
        super().__init__(augmentations, size, mean, std, standardize)


class _PixelAffine(K.RandomAffine):
    """RandomAffine whose translation is given in pixels (kornia takes a fraction of the side,
    which the side of the batch only fixes at call time)."""

    def __init__(
        self, rotation: float, translate_px: float, scale: tuple[float, float], shear: float = 0.0
    ) -> None:
        # None, not 0.0: kornia draws shear parameters for 0.0 too, which would shift the random
        # stream (and the recorded results) of every config without a shear.
        super().__init__(degrees=rotation, translate=None, scale=scale, shear=shear or None, p=1.0)
        self.translate_px = translate_px

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, Tensor]:
        params = super().generate_parameters(batch_shape)
        if self.translate_px:
            shift = (torch.rand_like(params["translations"]) * 2 - 1) * self.translate_px
            params["translations"] = shift
        return params


def _blend(degenerate: Tensor, images: Tensor, factor: Tensor) -> Tensor:
    """PIL's ImageEnhance: degenerate + factor x (image - degenerate), per-sample factor."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (images - degenerate)).clamp(0.0, 1.0)


def _grey(images: Tensor) -> Tensor:
    return images if images.shape[1] == 1 else kornia.color.rgb_to_grayscale(images)


def _affine(images: Tensor, matrix: Tensor) -> Tensor:
    """Warp by per-sample 2x3 matrices given about the image centre, in pixels."""
    h, w = images.shape[-2:]
    # Filled on the device: torch.tensor([...], device=...) copies from the host, and a blocking
    # copy waits for the device.
    centre = torch.full((2,), (w - 1) / 2, device=images.device)
    centre[1] = (h - 1) / 2
    matrix = matrix.clone()
    matrix[:, :, 2] += centre - matrix[:, :, :2] @ centre
    return kornia.geometry.transform.warp_affine(images, matrix, (h, w), align_corners=True)


def _rotate(images: Tensor, degrees: Tensor) -> Tensor:
    angle = torch.deg2rad(degrees)
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    return _affine(
        images, torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    )


def _shear(images: Tensor, amount: Tensor, axis: int) -> Tensor:
    matrix = torch.eye(2, 3, device=images.device).repeat(len(images), 1, 1)
    matrix[:, axis, 1 - axis] = amount
    return _affine(images, matrix)


def _translate(images: Tensor, fraction: Tensor, axis: int) -> Tensor:
    matrix = torch.eye(2, 3, device=images.device).repeat(len(images), 1, 1)
    matrix[:, axis, 2] = fraction * images.shape[-1 - axis]
    return _affine(images, matrix)


def _autocontrast(images: Tensor, _: Tensor) -> Tensor:
    low = images.amin((-2, -1), keepdim=True)
    high = images.amax((-2, -1), keepdim=True)
    scale = torch.where(high > low, 1.0 / (high - low).clamp_min(1e-6), torch.ones_like(high))
    return torch.where(high > low, (images - low) * scale, images)


# name -> (op(images, magnitude), low, high, symmetric): SCAN's RandAugment list and magnitude ranges
# (its data/augment.py). A magnitude is drawn uniformly in [low, high] per sample; a symmetric op
# also gets a random sign. Intensity factors follow PIL's ImageEnhance (1 = unchanged).
RANDAUGMENT_OPS = {
    "identity": (lambda x, m: x, 0.0, 1.0, False),
    "autocontrast": (_autocontrast, 0.0, 1.0, False),
    "equalize": (lambda x, m: kornia.enhance.equalize(x), 0.0, 1.0, False),
    "rotate": (_rotate, 0.0, 30.0, True),
    "solarize": (lambda x, m: kornia.enhance.solarize(x, m), 0.0, 1.0, False),
    "color": (lambda x, m: _blend(_grey(x).expand_as(x), x, m), 0.05, 0.95, False),
    "contrast": (lambda x, m: _blend(_grey(x).mean((-3, -2, -1), keepdim=True), x, m), 0.05, 0.95, False),
    "brightness": (lambda x, m: _blend(torch.zeros_like(x), x, m), 0.05, 0.95, False),
    "sharpness": (lambda x, m: kornia.enhance.sharpness(x, m), 0.05, 0.95, False),
    "shear_x": (lambda x, m: _shear(x, m, 0), 0.0, 0.1, True),
    "shear_y": (lambda x, m: _shear(x, m, 1), 0.0, 0.1, True),
    "translate_x": (lambda x, m: _translate(x, m, 0), 0.0, 0.1, True),
    "translate_y": (lambda x, m: _translate(x, m, 1), 0.0, 0.1, True),
    "posterize": (lambda x, m: kornia.enhance.posterize(x, m.round().long().clamp(1, 8)), 4.0, 8.0, False),
}


class RandAugment(nn.Module):
    """RandAugment with a fresh draw per sample: each image gets `num_ops` operations chosen at
    random (with replacement, as SCAN does), each at a random magnitude, applied in the order drawn.

    kornia.augmentation.auto.RandAugment draws the operations once per batch and uses one fixed
    magnitude, which is not the policy of SCAN / NNM; this one is written from kornia's functional
    ops. `ops` maps names of RANDAUGMENT_OPS to optional (low, high) ranges that replace the default.
    """

    def __init__(self, num_ops: int = 4, ops: dict[str, tuple[float, float] | None] | None = None) -> None:
        super().__init__()
        ops = ops if ops is not None else {name: None for name in RANDAUGMENT_OPS}
        unknown = sorted(set(ops) - set(RANDAUGMENT_OPS))
        if unknown:
            raise ConfigError(f"unknown RandAugment ops {unknown}; known: {', '.join(RANDAUGMENT_OPS)}")
        self.num_ops = num_ops
        self.ops = [
            (name, *(RANDAUGMENT_OPS[name][1:3] if rng is None else rng)) for name, rng in ops.items()
        ]

    def forward(self, images: Tensor) -> Tensor:
        # Each step deals the ops out over the batch like cards: the batch, padded to a multiple of
        # len(ops), is put in a random order and cut into len(ops) interleaved slices of one fixed
        # size, one op per slice. Every op then runs on its own images only, and the slices' sizes
        # are known to the host, so no step reads anything back from the device (a per-op `nonzero`
        # would), and every draw comes from the reseeded torch generator. An image's op is uniform
        # over the ops; unlike independent draws, each op gets n / len(ops) images of a batch (+-1).
        n, device, num = len(images), images.device, len(self.ops)
        padded = -(-n // num) * num  # the rows past n are blank and dropped at the end
        images = torch.cat([images, images.new_zeros((padded - n, *images.shape[1:]))])
        for _ in range(self.num_ops):
            unit = torch.rand(padded, device=device)
            sign = torch.randint(0, 2, (padded,), device=device) * 2 - 1
            order, out = torch.randperm(padded, device=device), torch.empty_like(images)
            for k, (name, low, high) in enumerate(self.ops):
                chosen = order[k::num]
                op, _, _, symmetric = RANDAUGMENT_OPS[name]
                magnitude = low + (high - low) * unit[chosen]
                if symmetric:
                    magnitude = magnitude * sign[chosen]
                out.index_copy_(0, chosen, op(images[chosen], magnitude).clamp(0.0, 1.0))
            images = out
        return images[:n]


class Cutout(nn.Module):
    """One square hole per image (DeVries & Taylor), side drawn in [1, max_fraction x side] per
    image, centre anywhere in the image (the hole is clipped at the border), filled with `fill`."""

    def __init__(self, max_fraction: float = 0.5, fill: float = 0.5) -> None:
        super().__init__()
        self.max_fraction, self.fill = max_fraction, fill

    def forward(self, images: Tensor) -> Tensor:
        n, _, h, w = images.shape
        device = images.device
        longest = max(1, int(self.max_fraction * min(h, w)))
        side = torch.randint(1, longest + 1, (n, 1, 1), device=device)
        cy, cx = torch.randint(h, (n, 1, 1), device=device), torch.randint(w, (n, 1, 1), device=device)
        ys, xs = torch.arange(h, device=device).view(1, h, 1), torch.arange(w, device=device).view(1, 1, w)
        hole = (ys >= cy - side // 2) & (ys < cy + side // 2) & (xs >= cx - side // 2) & (xs < cx + side // 2)
        return images.masked_fill(hole[:, None], self.fill)


class StrongViews(Views):
    """NNM's (and SCAN's) strong augmentation: flip, RandAugment (4 ops, random magnitude), Cutout.

    All on the device with per-sample draws. For small grey images use `ops` to keep the ones
    that make sense (experiments/nnm_digits.yaml: no flip, no colour / solarize / equalize).

    Args:
        size: output side (None: the input's); an optional resized `crop_scale` crop comes first.
        flip: random horizontal flip (p = 0.5).
        num_ops: RandAugment operations per image (4 in NNM).
        ops: RandAugment operations and ranges (None: SCAN's 14, see RANDAUGMENT_OPS).
        cutout: largest hole side as a fraction of the image side (0.5: SCAN's 16 px on 32 px);
            None turns Cutout off. cutout_fill: the hole's value in [0, 1] before normalisation
            (SCAN fills 0 after normalisation, i.e. the mean colour).
        standardize: per-image standardisation last (see `Views`).
    """

    def __init__(
        self,
        size: int | None = None,
        flip: bool = True,
        num_ops: int = 4,
        ops: dict[str, tuple[float, float] | None] | None = None,
        cutout: float | None = 0.5,
        cutout_fill: float = 0.5,
        crop_scale: tuple[float, float] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        standardize: bool = False,
    ) -> None:
        super().__init__((), size, mean, std, standardize)
        steps: list[nn.Module] = []
        if crop_scale is not None:
            if size is None:
                raise ConfigError("a random resized crop needs the output size: set size")
            steps.append(K.RandomResizedCrop((size, size), scale=crop_scale))
        if flip:
            steps.append(K.RandomHorizontalFlip())
        steps.append(RandAugment(num_ops, ops))
        if cutout is not None:
            steps.append(Cutout(cutout, cutout_fill))
        self.augment = nn.Sequential(*steps)
