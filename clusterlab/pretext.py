"""The hand-over from a pretext run (SimCLR) to a method that starts from its features (NNM, TEMI):
find the pretext checkpoint of a run's seed, copy its backbone, and mine every image's nearest
neighbours in its feature space once, cached beside the checkpoint under its content hash."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from clusterlab.distributed import broadcast, rank, read_on_rank0
from clusterlab.errors import CheckpointError, CheckpointMismatchError, UserError
from clusterlab.neighbors import knn, neighbor_agreement
from clusterlab.passes import Step, pass_over
from clusterlab.runs import load_checkpoint, load_failure
from clusterlab.seeding import run_seed


class PretextNotFoundError(UserError, FileNotFoundError):
    """No pretext checkpoint matches the path or pattern a config names."""


def resolve_pretext_checkpoint(pattern: str, method: str = "NNM") -> Path:
    """The newest file matching `pattern` ("{seed}" replaced by the run seed), or a clear error."""
    seed = run_seed()
    resolved = pattern.replace("{seed}", str(seed))
    matches = [m for m in glob.glob(os.path.expanduser(resolved)) if os.path.isfile(m)]
    if not matches:
        raise PretextNotFoundError(
            f"{method}: no pretext checkpoint matches '{resolved}' (model.init_args.pretext_checkpoint = "
            f"'{pattern}', "
            f"seed {seed}, relative to {os.getcwd()}). Train the pretext first with the same seed, e.g. "
            f"`clusterlab fit --config experiments/simclr_<dataset>.yaml --seed_everything {seed}`, or point "
            f"--model.init_args.pretext_checkpoint at a SimCLR checkpoint."
        )
    return Path(max(matches, key=os.path.getmtime))


def load_pretext_backbone(path: Path, backbone: nn.Module, method: str = "NNM") -> None:
    """Copy the backbone weights of a SimCLR checkpoint (its contrastive head is left behind).
    Read weights-only (`clusterlab.runs.load_checkpoint`): the file comes from a pattern in a
    config, and a pickle that names a function would run it."""
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointMismatchError(f"{method}'s pretext checkpoint: {error}") from None
    meta = checkpoint.get("clusterlab")
    if meta is None:
        raise CheckpointMismatchError(
            f"pretext checkpoint {path} was not written by clusterlab (no 'clusterlab' entry)"
        )
    if meta["method"] != "SimCLR":
        raise CheckpointMismatchError(
            f"pretext checkpoint {path} holds a {meta['method']} model; {method} needs a SimCLR one"
        )
    weights = {
        k[len("backbone.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")
    }
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointMismatchError(
            f"pretext checkpoint {path}: its backbone does not fit this {method} config's backbone "
            f"(use the pretext config's model.init_args.backbone): {str(error).splitlines()[0]}"
        ) from None


def checkpoint_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_neighbors(cache: Path, num_images: int, k: int) -> Tensor:
    """The cached N x k neighbour table, read weights-only (a planted pickle cannot run code); a
    file that is not one is refused with its path, not overwritten (clusterlab may not have written it)."""
    try:
        neighbors = torch.load(cache, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every way a file can fail to be a tensor
        raise CheckpointError(
            f"the neighbour cache {cache} cannot be read ({load_failure(error)}); delete it to mine the "
            "neighbours again"
        ) from None
    if not isinstance(neighbors, Tensor) or tuple(neighbors.shape) != (num_images, k):
        raise CheckpointError(
            f"the neighbour cache {cache} is not a {num_images} x {k} table; delete it to mine the "
            "neighbours again"
        )
    return neighbors.long()


def mine_neighbors(
    path: Path | None,
    k: int,
    module: nn.Module,
    loader,
    features: Step | Tensor,
    num_images: int,
    metric: str = "cosine",
) -> Tensor:
    """Top-k neighbours (N x k) of every image by its pretext features (Algorithm 1, line 2),
    through faiss, by `metric` ("cosine" or "l2", `clusterlab.neighbors.knn`). `features(batch)`
    gives the features of a batch ({"features": ...}); every process passes over its shard of
    `loader` (`clusterlab.passes.pass_over`), the features are gathered to rank 0, which searches
    and broadcasts (the others wait: clusterlab.distributed.PROCESS_GROUP_TIMEOUT). `features` may
    also be the table itself (N x D, on every process): then there is no pass. Cached beside the
    checkpoint (or weights file) `path` under its content hash, so a changed checkpoint is mined again;
    path None: not cached."""
    if k > num_images - 1:
        rank_zero_info(f"only {num_images} training images: mining {num_images - 1} neighbours, not {k}")
        k = num_images - 1
    device = next(module.parameters()).device
    cache = None
    if path is not None:
        cache = path.parent / f"neighbors-{checkpoint_digest(path)[:16]}-n{num_images}-k{k}-{metric}.pt"
    cached, found = read_on_rank0(
        cache, lambda p: _read_neighbors(p, num_images, k), "the neighbour cache", device
    )
    neighbors = (
        torch.zeros(num_images, k, dtype=torch.long, device=device) if cached is None else cached.to(device)
    )
    if found:
        rank_zero_info(f"neighbours from the cache {cache}")
    else:
        # Only rank 0 searches: the features go there alone; the table is broadcast to every rank.
        if isinstance(features, Tensor):
            mined = {"features": features}
        else:
            mined = pass_over(module, loader, features, description="Mining neighbours", rank0_only=True)
        if rank() == 0:
            neighbors = knn(mined["features"], k, metric=metric)[0].to(device)
            if cache is not None:
                torch.save(neighbors.cpu(), cache)
            rank_zero_info(
                f"mined the top-{k} neighbours of {num_images} images"
                + (f", cached in {cache}" if cache is not None else "")
            )
    return broadcast(neighbors).cpu()


def mine_for_training(
    method,
    k: int,
    load: Callable[[], Path | None],
    metric: str = "cosine",
    embed: Callable[[], Tensor] | None = None,
) -> None:
    """At the start of a fit: every training image's top-k neighbours by `method`'s backbone
    features (cosine: L2-normalised; "l2": raw), handed to its data module, whose batches then carry
    one of them per image; their label agreement goes to `method.diagnostics` (labels only report).
    `load()` runs once the data module is known to deliver neighbours: it loads the backbone's
    weights and returns the file the neighbours are cached beside (None: not cached). `embed()`,
    when given, returns the training images' features (N x D, the method's own, computed once):
    the neighbours are searched among them instead of a pass of their own."""
    name = type(method).__name__
    data = method.trainer.datamodule
    if data is None or not hasattr(data, "set_neighbors"):
        raise RuntimeError(
            f"{name} trains from a ClusterDataModule, which delivers each sample's mined neighbour"
        )
    anchor = load()
    method.to(method.trainer.strategy.root_device)  # the pass below runs on the training device

    def features(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        f = method.backbone(method.plain(batch["image"])).float()
        return {"features": F.normalize(f, dim=1) if metric == "cosine" else f}

    searched: Step | Tensor = features
    if embed is not None:  # the method's features, computed once: searched as they are
        table = embed()
        searched = F.normalize(table, dim=1) if metric == "cosine" else table
    neighbors = mine_neighbors(
        anchor, k, method, data.train_eval_dataloader(), searched, len(data.train_set), metric=metric
    )
    data.set_neighbors(neighbors)
    agreement = neighbor_agreement(neighbors, data.train_set.labels)
    if agreement is not None:
        method.diagnostics["neighbor_agreement"] = agreement
        source = f" from {anchor}" if anchor is not None else ""
        rank_zero_info(
            f"{name}: top-{neighbors.shape[1]} neighbours of {len(neighbors)} training images{source}: "
            f"label agreement {agreement:.4f}"
        )
