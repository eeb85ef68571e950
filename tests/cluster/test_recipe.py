"""clusterlab.cluster.recipe: the models the folder command trains, as configs: standardised
input, flips only where the folder has no side, renumberable clusters, the config the model."""

from __future__ import annotations

import copy
import math

import pytest
import torch


def test_standardised_views_do_not_see_a_colour_cast_or_exposure():
    from clusterlab.data.views import SimCLRViews

    views = SimCLRViews(size=16, standardize=True)
    images = torch.rand(4, 3, 16, 16)
    cast = images * torch.tensor([0.5, 0.9, 0.7]).view(1, 3, 1, 1) + torch.tensor([0.3, 0.0, 0.1]).view(
        1, 3, 1, 1
    )
    scale = images.std((-2, -1), keepdim=True)
    expected = views.plain(images)
    assert torch.allclose(views.plain(cast), expected, atol=0.05 * math.sqrt(3) / float(scale.min()))
    assert views.plain(cast).mean((-2, -1)).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["cc", "nnm", "scl", "dccm", "clusterlab.methods.SimCLR"])
def test_renumbered_clusters_are_the_same_clusters_under_new_numbers(method):
    from clusterlab.cluster import recipe

    model, _ = recipe.build(recipe.clustering(method, 16, 5, 100, 10, pretext_checkpoint="unused.ckpt"))
    model.eval()
    if model.cluster_head.fitted:  # k-means centres as a fit would leave them
        model.cluster_head.centroids.copy_(torch.randn_like(model.cluster_head.centroids))
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    before = model.predict_proba(images)[model.selected_head]
    memory = copy.deepcopy(model.semantic_memory["clustering"]) if hasattr(model, "semantic_memory") else None
    order = [3, 0, 4, 1, 2]
    model.permute_clusters_(order)
    after = model.predict_proba(images)[model.selected_head]
    assert torch.allclose(after, before[:, order], atol=1e-6)
    if memory is not None:  # SCL: the target task's memory holds one queue per cluster, renumbered too
        for name in ("keys", "index", "pointer"):
            assert torch.equal(
                getattr(model.semantic_memory["clustering"], name), getattr(memory, name)[order]
            )
    with pytest.raises(ValueError, match="not a permutation"):
        model.permute_clusters_([0, 0, 1, 2, 3])


def test_the_mirror_ratio_tells_digits_which_have_a_side_from_kinds_that_do_not():
    """Digits mirrored are not digits (a 2 mirrored is nearly a 5): about 3x as far from the other
    digits as a digit is. The same digits with half of them mirrored at random have no side: a
    mirror image is one more draw of the folder, the ratio is 1 up to sampling noise."""
    from sklearn.datasets import load_digits

    from clusterlab.cluster import recipe

    digits = torch.from_numpy(load_digits().images).float()[:, None] / 16.0
    images = (torch.nn.functional.interpolate(digits, size=32, mode="bilinear") * 255).to(torch.uint8)
    images = images.expand(-1, 3, -1, -1)
    assert recipe.mirror_ratio(images) > 2.0 * recipe.MIRROR_RATIO_LIMIT
    mirrored = torch.rand(len(images), generator=torch.Generator().manual_seed(0)) < 0.5
    no_side = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
    assert abs(recipe.mirror_ratio(no_side) - 1.0) < 0.1
    assert abs(recipe.mirror_ratio(no_side, max_images=500) - 1.0) < 0.15  # a sample of a large folder


@pytest.mark.parametrize("method", ["cc", "nnm", "scl", "dccm"])
def test_every_method_s_views_flip_only_when_the_recipe_says_so(method):
    from kornia.augmentation import RandomHorizontalFlip

    from clusterlab.cluster import recipe

    for flip in (True, False):
        model, resolved = recipe.build(recipe.clustering(method, 16, 5, 100, 10, "unused.ckpt", flip=flip))
        flips = [m for m in model.views.modules() if isinstance(m, RandomHorizontalFlip)]
        assert bool(flips) == flip and resolved["init_args"]["views"]["init_args"]["flip"] == flip
    model, _ = recipe.build(recipe.pretext(16, 5, flip=False))
    assert not [m for m in model.views.modules() if isinstance(m, RandomHorizontalFlip)]


@pytest.mark.parametrize("method", ["cc", "scl", "dccm", "clusterlab.methods.SimCLR"])
def test_views_without_flips_slant_instead(method):
    """A folder with a side (digits, text) varies by slant where a folder of objects varies by
    mirroring: its views shear by up to SLANT degrees; a folder that flips keeps SimCLR's views."""
    from clusterlab.cluster import recipe

    for flip in (True, False):  # the views' shear itself: tests/data/test_views.py
        _, resolved = recipe.build(recipe.clustering(method, 16, 5, 100, 10, "unused.ckpt", flip=flip))
        assert resolved["init_args"]["views"]["init_args"]["shear"] == (0.0 if flip else recipe.SLANT)


def test_the_recipe_config_is_the_model_trained():
    from clusterlab.cluster import recipe

    model, resolved = recipe.build(recipe.clustering("cc", 32, 7, 2000, 100))
    again, _ = recipe.build(resolved)
    assert type(again) is type(model) and again.num_clusters == 7
    assert [tuple(p.shape) for p in again.parameters()] == [tuple(p.shape) for p in model.parameters()]
    assert resolved["init_args"]["views"]["init_args"]["standardize"] is True
