"""The recipe for a folder of photos: models as configs, so that the config written is the model trained.

Every model is described the way an experiments/*.yaml file describes it (class paths and init
args) and built from that description by the same jsonargparse machinery as `clusterlab fit`;
the description goes into <out>/config.yaml, which `clusterlab predict` and `clusterlab fit` load.

What suits photos, for every method:

- input: each image standardised per channel (`ImageStandardize`): colour casts, exposure and
  contrast are removed before the network sees the image, so they cannot become clusters;
- views: SimCLR's (random resized crop 0.2-1, colour jitter of strength 1 and any hue with p 0.8,
  random greyscale p 0.5), as CC and SimCLR use on natural images; NNM's strong views
  (RandAugment + Cutout) and DCCM's small geometric perturbations, each with the same input;
  the horizontal flip only where the folder's mirror images look like its images
  (`mirror_ratio`: photos of objects, not digits or text);
- backbone: a VGG-style SmallCNN that halves the side down to 4 px (4 blocks at 32 px,
  16-128 channels, 98k parameters): ~1,600-1,800 images/s of two-view training on 2 idle CPU
  cores at 32 px, so that 2,000 images get about 250 epochs per phase within 10 minutes;
- optimiser: Adam 1e-3 (CC, SimCLR, NNM), RMSprop (DCCM), SGD 0.03 with a cosine schedule (SCL),
  as their digits configs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clusterlab.methods.base import ClusteringMethod

METHODS = ("cc", "nnm", "scl", "dccm")
CLASS_PATHS = {
    "cc": "clusterlab.methods.CC",
    "nnm": "clusterlab.methods.NNM",
    "scl": "clusterlab.methods.SCL",
    "dccm": "clusterlab.methods.DCCM",
    "simclr": "clusterlab.methods.SimCLR",
}


def backbone(size: int) -> dict:
    """SmallCNN halving the side down to about 4 px, channels doubling from 16 up to 256."""
    blocks = max(2, round(math.log2(max(size, 8))) - 1)
    widths = [min(256, 16 * 2**i) for i in range(blocks)]
    return {
        "class_path": "clusterlab.nn.SmallCNN",
        "init_args": {"in_channels": 3, "widths": widths, "downsample": [True] * (blocks - 1) + [False]},
    }


def views(kind: str, size: int, flip: bool = True) -> dict:
    """The views of `kind` (simclr, strong: NNM's, geometric: DCCM's), with the horizontal flip
    or without it (a folder whose mirror images are not of its kinds: `mirror_ratio`)."""
    if kind == "strong":  # NNM
        return {
            "class_path": "clusterlab.data.views.StrongViews",
            "init_args": {"size": size, "crop_scale": [0.2, 1.0], "flip": flip, "standardize": True},
        }
    if kind == "geometric":  # DCCM
        return {
            "class_path": "clusterlab.data.views.GeometricViews",
            "init_args": {"size": size, "flip": flip, "standardize": True},
        }
    return {
        "class_path": "clusterlab.data.views.SimCLRViews",
        "init_args": {
            "size": size,
            "crop_scale": [0.2, 1.0],
            "strength": 1.0,
            "hue": 0.5,
            "grayscale_p": 0.5,
            "flip": flip,
            "standardize": True,
        },
    }


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
    and the ratio is 1 up to sampling noise. Digits give about 3.
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


def _adam(lr: float = 1e-3) -> dict:
    return {"class_path": "torch.optim.Adam", "init_args": {"lr": lr}}


def pretext(size: int, num_clusters: int, flip: bool = True) -> dict:
    """SimCLR: the features K is chosen on, and the start of the clustering model."""
    return {
        "class_path": CLASS_PATHS["simclr"],
        "init_args": {
            "num_clusters": num_clusters,
            "backbone": backbone(size),
            "views": views("simclr", size, flip),
            "temperature": 0.5,
            "optimizer": _adam(),
        },
    }


def clustering(
    method: str,
    size: int,
    num_clusters: int,
    num_images: int,
    epochs: int,
    pretext_checkpoint: str | None = None,
    flip: bool = True,
) -> dict:
    """The clustering model of `method` with K clusters."""
    args: dict = {"num_clusters": num_clusters, "backbone": backbone(size)}
    if method == "cc":
        args.update(views=views("simclr", size, flip), optimizer=_adam())
    elif method == "nnm":
        args.update(
            views=views("strong", size, flip),
            pretext_checkpoint=pretext_checkpoint,
            num_neighbors=max(1, min(20, num_images // (2 * num_clusters))),
            optimizer=_adam(),
        )
    elif method == "scl":
        # SCL's under-clustering task has K // 2 clusters: none below K = 4.
        args.update(
            views=views("simclr", size, flip),
            memory_size=max(num_clusters, min(4096, num_images // 2)),
            under_clustering=num_clusters >= 4,
            optimizer={
                "class_path": "torch.optim.SGD",
                "init_args": {"lr": 0.03, "momentum": 0.9, "weight_decay": 0.0005},
            },
            lr_scheduler={
                "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
                "init_args": {"T_max": max(1, epochs)},
            },
        )
    elif method == "dccm":
        args.update(
            views=views("geometric", size, flip),
            discriminator_dim=128,
            optimizer={"class_path": "torch.optim.RMSprop", "init_args": {"lr": 0.001, "alpha": 0.9}},
        )
    else:
        raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    return {"class_path": CLASS_PATHS[method], "init_args": args}


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


# -- cluster numbering ---------------------------------------------------------------------------


def _rows(layer: nn.Module, order: torch.Tensor) -> None:
    """Output unit k of a Linear / BatchNorm1d becomes its old unit order[k]."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.ndim >= 1 and len(tensor) == len(order):
                tensor.copy_(tensor[order.to(tensor.device)])


def permute_clusters(model: ClusteringMethod, order: list[int]) -> None:
    """Renumber the clusters of the model's reported head: new cluster k is old cluster order[k].

    After this, `predict` (and every other use of the checkpoint) names clusters as the report
    does. Training state keyed by cluster (SCL's pseudo-label table) keeps the old numbers, so
    the renumbered checkpoint is for prediction, not for further training.
    """
    index = torch.as_tensor(order, dtype=torch.long)
    if sorted(order) != list(range(model.num_clusters)):
        raise ValueError(f"{order} is not a permutation of the {model.num_clusters} clusters")
    if getattr(model, "kmeans", None) is not None:  # a k-means cluster head (SimCLR, CC "ICH only")
        _rows_of_buffer(model.kmeans.centroids, index)
        return
    name = type(model).__name__
    if name == "CC":
        for head in model.cluster_projector.heads:
            _rows(head[-1], index)
    elif name == "NNM":
        _rows(model.cluster_heads.heads[model.selected_head], index)
    elif name == "DCCM":
        for head in model.cluster_heads:
            for layer in head:
                _rows(layer, index)
    elif name == "SCL":
        task = "clustering"
        if model.hparams.use_concept_loss:
            _rows(model.classifiers[task], index)
        memory = model.semantic_memory[task]
        for buffer in (memory.keys, memory.index, memory.pointer):
            _rows_of_buffer(buffer, index)
    else:
        raise NotImplementedError(f"renumbering the clusters of {name} is not supported")


def _rows_of_buffer(buffer: torch.Tensor, index: torch.Tensor) -> None:
    if len(buffer) == len(index):
        buffer.copy_(buffer[index.to(buffer.device)])
