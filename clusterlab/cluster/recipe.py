"""The recipe for a folder of photos: models as configs, so that the config written is the model trained.

Every model is described the way an experiments/*.yaml file describes it (class paths and init
args) and built from that description by the same jsonargparse machinery as `clusterlab fit`;
the description goes into <out>/config.yaml, which `clusterlab predict` and `clusterlab fit` load.

What is specific to a method (its views, optimiser, sizes as functions of the folder, whether it
starts from a pretext) it declares next to its class, as `folder_recipe`
(`clusterlab.methods.base.FolderRecipe`); `--method` names one of `clusterlab.methods.FOLDER_METHODS`
or gives the class path of any ClusteringMethod that declares one. This module adds what is the
same for every method:

- input: each image standardised per channel (`ImageStandardize`): colour casts, exposure and
  contrast are removed before the network sees the image, so they cannot become clusters;
- views: the method's, at the working size, each image standardised, with the horizontal flip
  only where the folder's mirror images look like its images (`mirror_ratio`: photos of
  objects, not digits or text), and slanted where they do not (`SLANT`);
- backbone: a VGG-style SmallCNN that halves the side down to 4 px (4 blocks at 32 px,
  16-128 channels, 98k parameters): small enough that a folder of a few thousand images gets
  hundreds of epochs per phase on 2 CPU cores within the command's default budget (figures:
  docs/results.md, "Measurements behind design choices");
- the pretext (SimCLR's own recipe): the features K is chosen on, and the start of a method
  that has a pretext stage or starts warm.
"""

from __future__ import annotations

import copy
import importlib
import math

import torch

from clusterlab.config_checks import class_signature
from clusterlab.errors import ConfigError
from clusterlab.methods import FOLDER_METHODS
from clusterlab.methods.base import ClusteringMethod, FolderRecipe

METHODS = tuple(FOLDER_METHODS)
PRETEXT = "clusterlab.methods.SimCLR"


def method_class(method: str) -> type[ClusteringMethod]:
    """The class `--method` names: a registered name (cc, nnm, scl, dccm, temi) or the class path of a
    ClusteringMethod that declares a `folder_recipe`; a ConfigError that says which otherwise."""
    path = class_path(method)
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, ClusteringMethod)):
        raise ConfigError(
            f"--method {method}: neither one of {', '.join(METHODS)} nor the class path of a "
            "ClusteringMethod (package.module.Class)"
        )
    if cls.folder_recipe is None:
        raise ConfigError(
            f"--method {method}: {cls.__name__} declares no folder_recipe (docs/adding-a-method.md), so "
            "the folder command does not know how to build it"
        )
    return cls


def class_path(method: str) -> str:
    """The class path of a registered name, or `method` itself."""
    return FOLDER_METHODS.get(method, method)


def method_recipe(method: str) -> FolderRecipe:
    return method_class(method).folder_recipe


def backbone(size: int) -> dict:
    """SmallCNN halving the side down to about 4 px, channels doubling from 16 up to 256."""
    blocks = max(2, round(math.log2(max(size, 8))) - 1)
    widths = [min(256, 16 * 2**i) for i in range(blocks)]
    return {
        "class_path": "clusterlab.nn.SmallCNN",
        "init_args": {"in_channels": 3, "widths": widths, "downsample": [True] * (blocks - 1) + [False]},
    }


def pretrained(name: str, weights: str | None = None, precision: str = "32") -> dict:
    """A frozen pretrained network (`clusterlab.nn.Pretrained`): its weights from `weights`, or, without
    it, from the installed package or torchvision's cache; embedding in `precision` (32, bf16)."""
    return {
        "class_path": "clusterlab.nn.Pretrained",
        "init_args": {
            "name": name,
            "weights": weights,
            "frozen": True,
            "in_channels": 3,
            "precision": precision,
        },
    }


def views(recipe: FolderRecipe, size: int, flip: bool = True, pretrained: bool = False) -> dict:
    """The recipe's views at `size`, each image standardised, with the horizontal flip or, for a
    folder whose mirror images are not of its kinds (`mirror_ratio`), without it and slanted
    (`SLANT`, where the views take a shear). A method on frozen features sees the images as they
    are (no augmentation): standardised at `size` as the folder's SimCLR pretext sees them, or, for
    a `pretrained` network, as they are decoded (the network resizes and normalises its input as its
    weights expect)."""
    if recipe.frozen_features:
        plain = {} if pretrained else {"size": size, "standardize": True}
        return {"class_path": recipe.views, "init_args": {**plain, **copy.deepcopy(recipe.view_args)}}
    args = {"size": size, **copy.deepcopy(recipe.view_args), "flip": flip, "standardize": True}
    signature = class_signature(recipe.views)
    if not flip and signature is not None and "shear" in signature.parameters:
        args["shear"] = SLANT
    return {"class_path": recipe.views, "init_args": args}


# The slant of the views of a folder without flips, in degrees (+-, a shear parallel to the x axis,
# where the method's views take one): what a folder whose images have a side (digits, text) varies
# by instead. CC on digits held on every seed only once its views slanted by 20 degrees
# (experiments/cc_digits.yaml); the folder figures are in docs/cluster-folder.md.
SLANT = 20.0

# A mirrored image is this much farther from the folder than the image itself: the folder's
# images have a side (digits, text, shoes that all point left), and a flipped view would teach
# the network that a kind and its mirror image (2 and 5) are one.
MIRROR_RATIO_LIMIT = 1.25


@torch.no_grad()
def mirror_ratio(images: torch.Tensor, max_images: int = 5000, seed: int = 0) -> float:
    """Are the folder's mirror images images of the folder? The median distance (1 - cosine) from
    an image's mirror image to its nearest other image, over the median distance from the image
    itself to its nearest other image; grey, 16 px, each image standardised (casts and exposure do
    not count).

    If mirroring does not change what images look like (photos of objects, scenes), a mirror
    image is one more draw from the folder: it is as near to the other images as the image is,
    and the ratio is 1 up to sampling noise. Digits, whose mirror images are no digit or another
    one, give a ratio far above 1 (figures: docs/results.md, "Measurements behind design choices").
    """
    n = len(images)
    pick = torch.arange(n)
    if n > max_images:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
    grey = torch.as_tensor(images[pick.numpy()]).float().mean(1, keepdim=True)
    grey = torch.nn.functional.adaptive_avg_pool2d(grey, 16)

    def standardised(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return torch.nn.functional.normalize(x - x.mean(1, keepdim=True), dim=1)

    from clusterlab.neighbors import knn

    plain, mirrored = standardised(grey), standardised(grey.flip(-1))
    plain_similarity = knn(plain, 1)[1][:, 0]  # the nearest other image
    # A mirror image's nearest image other than its own original (which a symmetric image is near).
    indices, similarity = knn(plain, 2, queries=mirrored)
    own = indices[:, 0] == torch.arange(len(plain))
    mirrored_similarity = torch.where(own, similarity[:, 1], similarity[:, 0])
    return float((1.0 - mirrored_similarity).median() / (1.0 - plain_similarity).median().clamp_min(1e-8))


def pretext(size: int, num_clusters: int, flip: bool = True) -> dict:
    """SimCLR: the features K is chosen on, and the start of the clustering model."""
    return model_config(PRETEXT, size, num_clusters, num_images=0, epochs=0, flip=flip)


def clustering(
    method: str,
    size: int,
    num_clusters: int,
    num_images: int,
    epochs: int,
    pretext_checkpoint: str | None = None,
    flip: bool = True,
    network: dict | None = None,
) -> dict:
    """The clustering model of `method` (a registered name or a class path) with K clusters;
    `network`: a pretrained backbone's config (`pretrained`) in place of the recipe's own."""
    method_class(method)  # a clear error for a method the folder command cannot build
    return model_config(
        class_path(method), size, num_clusters, num_images, epochs, pretext_checkpoint, flip, network
    )


def model_config(
    path: str,
    size: int,
    num_clusters: int,
    num_images: int,
    epochs: int,
    pretext_checkpoint: str | None = None,
    flip: bool = True,
    network: dict | None = None,
) -> dict:
    """The config of the class at `path` from its folder recipe: backbone and views for `size`
    (`network`: a pretrained backbone's config instead), the recipe's sizes for N images and K
    clusters, its optimiser and schedule for E epochs."""
    recipe = method_class(path).folder_recipe
    args: dict = {
        "num_clusters": num_clusters,
        "backbone": copy.deepcopy(network) if network is not None else backbone(size),
        "views": views(recipe, size, flip, pretrained=network is not None),
    }
    if recipe.pretext_checkpoint:
        args["pretext_checkpoint"] = pretext_checkpoint
    args.update(recipe.sizes(num_images, num_clusters))
    args.update(copy.deepcopy(recipe.args))
    args["optimizer"] = copy.deepcopy(recipe.optimizer)
    if recipe.lr_scheduler is not None:
        args["lr_scheduler"] = recipe.lr_scheduler(epochs)
    return {"class_path": path, "init_args": args}


def _parser():
    from pytorch_lightning.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ClusteringMethod, "model", required=True)
    return parser


def build(model: dict) -> tuple[ClusteringMethod, dict]:
    """The model a config describes, built as `clusterlab fit` builds it, and the config with
    every default filled in (what config.yaml records). Its checkpoint's hyperparameters are
    the CLI's too (the class path and every init arg), which `clusterlab predict --ckpt_path`
    reads back."""
    import yaml

    parser = _parser()
    namespace = parser.parse_object({"model": model})
    resolved = yaml.safe_load(parser.dump(namespace, skip_none=False))["model"]
    built = parser.instantiate_classes(namespace).model
    # The hyper-parameters as LightningCLI records them, so that `load_from_checkpoint` (and
    # `clusterlab predict`) rebuilds the model through Lightning's own instantiator; a dict given to
    # the public save_hyperparameters replaces what __init__ saved.
    built.save_hyperparameters(
        {
            "_class_path": resolved["class_path"],
            "_instantiator": "pytorch_lightning.cli.instantiate_module",
            **resolved.get("init_args", {}),
        }
    )
    return built, resolved


def warm_start(model: ClusteringMethod, source: ClusteringMethod) -> None:
    """Start the clustering model from the pretext's backbone (CC: as SCAN starts its clustering
    step from the pretext), so that the two phases share the training budget."""
    model.backbone.load_state_dict(source.backbone.state_dict())
