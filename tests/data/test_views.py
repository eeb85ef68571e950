"""Views: per-image random draws on the device, and the un-augmented input."""

import random

import pytest
import torch

from clusterlab.data.sources import Digits
from clusterlab.data.views import (
    GeometricViews,
    RandAugment,
    SimCLRViews,
    SmallImageViews,
    StrongViews,
    Views,
)


def test_each_image_gets_its_own_draw():
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    batch = image.repeat(16, 1, 1, 1)
    views = SimCLRViews(size=32)(batch)
    distinct = {tuple(v.flatten()[:64].tolist()) for v in views}
    assert len(distinct) > 8  # torchvision v2 would give 16 identical views here


def test_two_calls_give_two_different_views():
    batch = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    family = SmallImageViews()
    assert not torch.allclose(family(batch), family(batch))


def test_plain_is_the_image_resized_and_normalised():
    batch = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    family = SimCLRViews(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    plain = family.plain(batch)
    assert plain.shape == (4, 3, 32, 32) and plain.dtype == torch.float32
    assert torch.equal(plain, family.plain(batch))
    assert family(batch).shape == (4, 3, 32, 32)
    unresized = Views().plain(batch)
    assert torch.allclose(unresized, batch.float() / 255)


def test_small_image_views_keep_native_size_and_range():
    batch = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    out = SmallImageViews(noise_std=0.0)(batch)
    assert out.shape == batch.shape
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6


def test_fashion_style_crop_outputs_the_configured_size():
    batch = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    family = SmallImageViews(
        rotation=0, translate=0, scale=(1.0, 1.0), crop_scale=(0.5, 1.0), flip=True, size=28
    )
    assert family(batch).shape == (4, 1, 28, 28)


def test_strong_views_draw_operations_and_magnitudes_per_image():
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    views = StrongViews(size=32)(image.repeat(32, 1, 1, 1))
    assert views.shape == (32, 3, 32, 32) and views.min() >= 0 and views.max() <= 1
    assert len({tuple(v.flatten()[::7].tolist()) for v in views}) > 24
    identity = RandAugment(4, {"identity": None})(image.float() / 255)
    assert torch.equal(identity, image.float() / 255)
    with pytest.raises(ValueError, match="unknown RandAugment ops \\['twirl'\\]"):
        RandAugment(4, {"twirl": None})


def test_geometric_views_draw_per_image_and_keep_size_and_range():
    image = Digits().load("train+test").images[:1]
    views = GeometricViews(flip=False)(image.repeat(16, 1, 1, 1))
    assert views.shape == (16, 1, 8, 8) and views.min() >= 0 and views.max() <= 1
    assert len({tuple(v.flatten().tolist()) for v in views}) == 16
    still = GeometricViews(rotation=0, shift=0, zoom=(1.0, 1.0), flip=False, channel_shift=0)
    torch.testing.assert_close(still(image), image.float() / 255)


def _slant(images: torch.Tensor) -> torch.Tensor:
    """Per image: the bar's horizontal centre in the top rows minus in the bottom rows (pixels)."""
    columns = torch.arange(images.shape[-1], dtype=torch.float32)

    def centre(rows: torch.Tensor) -> torch.Tensor:
        mass = rows.sum(dim=(1, 2))
        return (mass * columns).sum(-1) / mass.sum(-1)

    return centre(images[:, :, 4:10]) - centre(images[:, :, -10:-4])


def _on_rgb(views):
    """SimCLR's views take RGB (colour jitter): the grey bar, three times."""
    return lambda images: views(images.expand(-1, 3, -1, -1))


@pytest.mark.parametrize(
    "family",
    [
        lambda shear: SmallImageViews(
            rotation=0,
            translate=0,
            scale=(1.0, 1.0),
            shear=shear,
            brightness=0,
            contrast=0,
            noise_std=0,
            erasing=None,
        ),
        lambda shear: GeometricViews(
            rotation=0, shift=0, zoom=(1.0, 1.0), shear=shear, flip=False, channel_shift=0
        ),
        lambda shear: _on_rgb(
            SimCLRViews(
                size=32, crop_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, flip=False, shear=shear
            )
        ),
    ],
    ids=["small_image_views", "geometric_views", "simclr_views"],
)
def test_shear_slants_an_upright_stroke_both_ways_and_zero_keeps_it_upright(family):
    """Handwriting slant: a vertical bar comes out leaning left or right, per image."""
    bar = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    bar[..., 2:30, 14:18] = 255
    batch = bar.repeat(64, 1, 1, 1)
    slant = _slant(family(30.0)(batch))
    assert slant.min() < -2 and slant.max() > 2  # up to tan(30 deg) x 20 rows = 11.5 px each way
    assert len({round(s, 3) for s in slant.tolist()}) > 32
    assert _slant(family(0.0)(batch)).abs().max() < 1e-4


def test_simclr_views_without_the_flip_never_mirror():
    """`flip=False` (digits, text): with crop and colour off, every view is the image itself."""
    image = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    image[..., 2:14, 2:5] = 255  # a bar on the left: a mirror image has it on the right
    batch = image.repeat(32, 1, 1, 1)
    still = dict(crop_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, size=16)
    torch.testing.assert_close(SimCLRViews(**still, flip=False)(batch), batch.float() / 255)
    mirrored = SimCLRViews(**still)(batch)[..., 11:].sum(dim=(1, 2, 3)) > 0
    assert 0 < mirrored.sum() < 32  # the default flips about half


def test_randaugment_deals_one_op_per_image_and_step_evenly_over_the_batch():
    # Two ops told apart by their output: identity, or black (brightness at factor 0).
    torch.manual_seed(0)
    deal = RandAugment(1, {"identity": None, "brightness": (0.0, 0.0)})
    images = 0.5 + 0.5 * torch.rand(7, 1, 4, 4)  # no black pixel
    black = []
    for _ in range(400):
        out = deal(images)
        black.append((out.flatten(1) == 0).all(1))
        kept = ~black[-1]
        assert torch.equal(out[kept], images[kept])  # the other op leaves its images untouched
    black = torch.stack(black).float()
    assert set(black.sum(1).tolist()) == {3.0, 4.0}  # 7 images over 2 ops: 3 and 4, either way
    assert (black.mean(0) - 0.5).abs().max() < 0.1  # and each image's op is uniform over the ops


def test_randaugment_draws_only_from_the_torch_generator():
    """A resumed run reseeds torch's generator per step (clusterlab.seeding): the same seed, the
    same views, whatever else drew random numbers before (Python's `random` included)."""
    images = torch.rand(16, 3, 8, 8)
    deal = RandAugment(4)
    torch.manual_seed(1)
    first = deal(images)
    random.random()
    torch.manual_seed(1)
    assert torch.equal(deal(images), first)
