"""Nearest Neighbor Matching ("Nearest Neighbor Matching for Deep Clustering", Dang et al., CVPR 2021),
Algorithm 1.

Stage 1 (pretext) is `clusterlab.methods.SimCLR`, a run of its own. This method is stages 2 and 3:
when a `fit` starts it loads the pretext backbone named by `pretext_checkpoint` (without the
contrastive head), mines the top-K neighbours of every training image from its features (cached
beside the checkpoint, keyed by the checkpoint's content), hands them to the data module, and
trains the cluster heads by matching each sample with its pretext, local (batch) and global
(whole training set, previous epoch) neighbours.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from clusterlab.callbacks.global_neighbors import GlobalNeighbors, HasFeaturesAndLogits
from clusterlab.data.views import Views
from clusterlab.distributed import broadcast, gather, rank
from clusterlab.errors import CheckpointError, ConfigError, UserError
from clusterlab.losses.nnm import class_contrastive_loss, consistency_loss, entropy_loss
from clusterlab.methods.base import (
    CheckpointMismatchError,
    ClusteringMethod,
    FolderRecipe,
    LRSchedulerCallable,
    OptimizerCallable,
)
from clusterlab.neighbors import knn, neighbor_agreement
from clusterlab.nn.heads import ClusterHeads
from clusterlab.passes import Step, pass_over
from clusterlab.runs import load_checkpoint, load_failure
from clusterlab.seeding import run_seed


class PretextNotFoundError(UserError, FileNotFoundError):
    """No pretext checkpoint matches the path or pattern the NNM config names."""


class NNM(ClusteringMethod, HasFeaturesAndLogits):
    """Cluster heads trained to agree with each sample's pretext, local and global neighbours.

    Args:
        num_clusters: C.
        backbone: the pretext's backbone architecture; its weights come from `pretext_checkpoint`.
        views: the strong views (flip, RandAugment with 4 random ops, Cutout), used for the anchor,
            the anchor's second view and the neighbour.
        pretext_checkpoint: the SimCLR checkpoint, a path or a glob; "{seed}" is replaced by this
            run's seed, and the newest match is used (e.g.
            runs/simclr_cifar10/*-seed{seed}/checkpoints/last.ckpt).
        num_heads: cluster heads, each a Linear(D, C) (3 in the paper; Table 4).
        num_neighbors: K, the mined pretext neighbours per image (20).
        global_neighbors: global neighbours searched per sample, one drawn at random (1; Table 5).
        entropy_weight: lambda of Eq. 11 (5).
        temperature: tau of the class contrastive losses (1).
        use_local_loss, use_global_loss, use_consistency_loss, use_class_contrastive_loss,
            use_entropy_loss: the ablations of Table 3 ("w/o consistent loss" turns off both
            consistency terms, "w/o class contrastive loss" both class terms).
        second_view: A = [p; p_aug] with a second strong view of the anchor (the authors' code);
            false: A = [p; p], Eq. 7 as printed.
        global_matching: what Eqs. 9-10 match with N_global(h)_b. "paper": the three blocks
            [p; N_local(p); N_pre(p)] of Eqs. 9-10. "code": the authors' code, [A; P] =
            [p; p_aug; N_pre(p); N_local(p)], four blocks (p twice when second_view is false).
        mining_metric: how the pretext neighbours are mined: "cosine" (L2-normalised features,
            inner product: SCAN's and the paper's "nearest") or "l2" (Euclidean distance on the
            raw features, the authors' code).
        optimizer: Adam, lr 1e-4, weight decay 1e-4 in the paper (100 epochs, batch 200).
    """

    # On a folder of photos: the strong views, Adam 1e-3, the SimCLR pretext the folder command
    # trains first, and K neighbours for about half of a cluster's images (at most the paper's 20).
    folder_recipe = FolderRecipe(
        views="clusterlab.data.views.StrongViews",
        view_args={"crop_scale": [0.2, 1.0]},
        sizes=lambda num_images, num_clusters: {
            "num_neighbors": max(1, min(20, num_images // (2 * num_clusters)))
        },
        pretext_checkpoint=True,
    )

    def __init__(
        self,
        num_clusters: int,
        backbone: nn.Module,
        views: Views,
        pretext_checkpoint: str,
        num_heads: int = 3,
        num_neighbors: int = 20,
        global_neighbors: int = 1,
        entropy_weight: float = 5.0,
        temperature: float = 1.0,
        use_local_loss: bool = True,
        use_global_loss: bool = True,
        use_consistency_loss: bool = True,
        use_class_contrastive_loss: bool = True,
        use_entropy_loss: bool = True,
        second_view: bool = True,
        global_matching: Literal["paper", "code"] = "paper",
        mining_metric: Literal["cosine", "l2"] = "cosine",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            num_clusters, backbone, num_heads=num_heads, optimizer=optimizer, lr_scheduler=lr_scheduler
        )
        self.save_hyperparameters()
        matching = (use_local_loss or use_global_loss) and (
            use_consistency_loss or use_class_contrastive_loss
        )
        if not (matching or use_entropy_loss):
            raise ConfigError("NNM: every loss term is switched off; keep at least one")
        self.views = views
        self.cluster_head = ClusterHeads(backbone.out_dim, num_clusters, num_heads)
        self.global_neighbors = GlobalNeighbors(global_neighbors)

    def configure_callbacks(self):
        return [self.global_neighbors]

    # -- Algorithm 1, lines 1-3: pretext weights and mined neighbours --------------------------

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        data = self.trainer.datamodule
        if data is None or not hasattr(data, "set_neighbors"):
            raise RuntimeError(
                "NNM trains from a ClusterDataModule, which delivers each sample's mined neighbour"
            )
        path = resolve_pretext_checkpoint(self.hparams.pretext_checkpoint)
        # A resumed run then overwrites these weights with its own checkpoint's.
        load_pretext_backbone(path, self.backbone)
        self.to(self.trainer.strategy.root_device)  # the pass below runs on the training device

        def pretext_features(batch: dict[str, Tensor]) -> dict[str, Tensor]:
            features = self.backbone(self.plain(batch["image"])).float()
            return {
                "features": F.normalize(features, dim=1)
                if self.hparams.mining_metric == "cosine"
                else features
            }

        neighbors = mine_neighbors(
            path,
            self.hparams.num_neighbors,
            self,
            data.train_eval_dataloader(),
            pretext_features,
            len(data.train_set),
            metric=self.hparams.mining_metric,
        )
        data.set_neighbors(neighbors)
        agreement = neighbor_agreement(neighbors, data.train_set.labels)
        if agreement is not None:
            self.diagnostics["neighbor_agreement"] = agreement
            rank_zero_info(
                f"NNM: top-{neighbors.shape[1]} pretext neighbours of {len(neighbors)} training "
                f"images from {path}: label agreement {agreement:.4f}"
            )

    # -- Algorithm 1, lines 5-15 --------------------------------------------------------------

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if "neighbor_image" not in batch:
            raise RuntimeError(
                "NNM: the batch has no 'neighbor_image': the mined neighbours were not handed to the data "
                "module"
            )
        anchor = batch["image"]
        f = self.backbone(self.views(anchor))  # f: embedded features of the anchors (line 8)
        p = self._global_probabilities(f)  # p: heads x B x C
        p_aug = (
            self._global_probabilities(self.backbone(self.views(anchor))) if self.hparams.second_view else p
        )
        n_pre = self._global_probabilities(
            self.backbone(self.views(batch["neighbor_image"]))
        )  # N_pre(p), line 9
        # Everything below is over the global batch.
        f = gather(f)
        # N_local(f): nearest other anchor, Eq. 6; searched where f is (faiss would mean a round
        # trip through the host every step).
        local = knn(f.detach(), 1, backend="torch")[0][:, 0]
        n_local = p[:, local]  # N_local(p)
        a, positives = torch.cat([p, p_aug], 1), torch.cat([n_pre, n_local], 1)  # A and P of Eqs. 7-8
        n_global = (
            self.global_neighbors.predictions(gather(batch["index"]))
            if self.hparams.use_global_loss
            else None
        )
        consistency, class_contrast = (
            self.hparams.use_consistency_loss,
            self.hparams.use_class_contrastive_loss,
        )
        tau = self.hparams.temperature

        heads: list[dict[str, Tensor]] = []
        for h in range(self.num_heads):
            head = {}
            if self.hparams.use_local_loss and consistency:
                head["local_consistency"] = consistency_loss(a[h], positives[h])  # Eq. 7
            if self.hparams.use_local_loss and class_contrast:
                head["local_class"] = class_contrastive_loss(a[h], positives[h], tau)  # Eq. 8
            if n_global is not None:  # from the second epoch on (line 10)
                samples = global_blocks(p[h], p_aug[h], n_pre[h], n_local[h], self.hparams.global_matching)
                blocks = len(samples) // len(p[h])
                target = n_global[h].to(samples).repeat(blocks, 1)  # N_global(h)_b for each block
                if consistency:
                    head["global_consistency"] = consistency_loss(samples, target)  # Eq. 9
                if class_contrast:
                    head["global_class"] = class_contrastive_loss(samples, target, tau)  # Eq. 10
            if self.hparams.use_entropy_loss:
                head["entropy"] = self.hparams.entropy_weight * entropy_loss(a[h])  # lambda x Eq. 5
            heads.append(head)
        terms = {
            name: torch.stack([head[name] for head in heads]).sum() for name in heads[0]
        }  # summed over heads
        head_losses = torch.stack([torch.stack(list(head.values())).sum() for head in heads])
        return self.objective(terms, head_losses=head_losses)  # Eq. 11 per head, heads summed

    def _global_probabilities(self, features: Tensor) -> Tensor:
        """Every head's cluster probabilities over the global batch: heads x (global B) x C."""
        return gather(self.cluster_head(features).float().softmax(-1).transpose(0, 1)).transpose(0, 1)

    # -- prediction ---------------------------------------------------------------------------

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features (N x D) and every head's logits (heads x N x C): what the global
        neighbour table is built from."""
        f = self.backbone(x)
        return f, self.cluster_head(f)


def global_blocks(p: Tensor, p_aug: Tensor, n_pre: Tensor, n_local: Tensor, form: str = "paper") -> Tensor:
    """The rows Eqs. 9-10 match with N_global(h)_b, block after block (each B x C): the paper's
    [p; N_local(p); N_pre(p)], or the authors' code's [p; p_aug; N_pre(p); N_local(p)]."""
    if form == "paper":
        return torch.cat([p, n_local, n_pre])
    if form == "code":
        return torch.cat([p, p_aug, n_pre, n_local])
    raise ConfigError(f"global_matching must be 'paper' or 'code', not {form!r}")


# -- the pretext hand-over ----------------------------------------------------------------------


def resolve_pretext_checkpoint(pattern: str) -> Path:
    """The newest file matching `pattern` ("{seed}" replaced by the run seed), or a clear error."""
    seed = run_seed()
    resolved = pattern.replace("{seed}", str(seed))
    matches = [m for m in glob.glob(os.path.expanduser(resolved)) if os.path.isfile(m)]
    if not matches:
        raise PretextNotFoundError(
            f"NNM: no pretext checkpoint matches '{resolved}' (model.init_args.pretext_checkpoint = "
            f"'{pattern}', "
            f"seed {seed}, relative to {os.getcwd()}). Train the pretext first with the same seed, e.g. "
            f"`clusterlab fit --config experiments/simclr_<dataset>.yaml --seed_everything {seed}`, or point "
            f"--model.init_args.pretext_checkpoint at a SimCLR checkpoint."
        )
    return Path(max(matches, key=os.path.getmtime))


def load_pretext_backbone(path: Path, backbone: nn.Module) -> None:
    """Copy the backbone weights of a SimCLR checkpoint (its contrastive head is left behind).
    Read weights-only (`clusterlab.runs.load_checkpoint`): the file comes from a pattern in a
    config, and a pickle that names a function would run it."""
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointMismatchError(f"NNM's pretext checkpoint: {error}") from None
    meta = checkpoint.get("clusterlab")
    if meta is None:
        raise CheckpointMismatchError(
            f"pretext checkpoint {path} was not written by clusterlab (no 'clusterlab' entry)"
        )
    if meta["method"] != "SimCLR":
        raise CheckpointMismatchError(
            f"pretext checkpoint {path} holds a {meta['method']} model; NNM needs a SimCLR one"
        )
    weights = {
        k[len("backbone.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")
    }
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointMismatchError(
            f"pretext checkpoint {path}: its backbone does not fit this NNM config's backbone "
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
            f"NNM: the neighbour cache {cache} cannot be read ({load_failure(error)}); delete it to mine the "
            "neighbours again"
        ) from None
    if not isinstance(neighbors, Tensor) or tuple(neighbors.shape) != (num_images, k):
        raise CheckpointError(
            f"NNM: the neighbour cache {cache} is not a {num_images} x {k} table; delete it to mine the "
            "neighbours again"
        )
    return neighbors.long()


def mine_neighbors(
    path: Path, k: int, module: nn.Module, loader, features: Step, num_images: int, metric: str = "cosine"
) -> Tensor:
    """Top-k neighbours (N x k) of every image by its pretext features (Algorithm 1, line 2),
    through faiss, by `metric` ("cosine" or "l2", `clusterlab.neighbors.knn`). `features(batch)`
    gives the features of a batch ({"features": ...}); every process passes over its shard of
    `loader` (`clusterlab.passes.pass_over`), the features are gathered to rank 0, which searches
    and broadcasts (the others wait: clusterlab.distributed.PROCESS_GROUP_TIMEOUT). Cached beside the
    checkpoint under the checkpoint's content hash, so a changed checkpoint is mined again."""
    if k > num_images - 1:
        rank_zero_info(f"NNM: only {num_images} training images: mining {num_images - 1} neighbours, not {k}")
        k = num_images - 1
    device = next(module.parameters()).device
    cache = path.parent / f"neighbors-{checkpoint_digest(path)[:16]}-n{num_images}-k{k}-{metric}.pt"
    # Rank 0 looks at the cache and says what it found (0: none, 1: read, 2: unreadable), so that
    # every process takes the same branch (and stops together on a bad file, not in a hang).
    neighbors = torch.zeros(num_images, k, dtype=torch.long, device=device)
    found, problem = 0, None
    if rank() == 0 and cache.exists():
        try:
            neighbors, found = _read_neighbors(cache, num_images, k).to(device), 1
        except CheckpointError as error:
            found, problem = 2, error
    found = int(broadcast(torch.tensor(found, device=device)))
    if found == 2:
        raise problem or CheckpointError(f"NNM: the neighbour cache {cache} cannot be read (rank 0 says why)")
    if found == 1:
        rank_zero_info(f"NNM: neighbours from the cache {cache}")
    else:
        # Only rank 0 searches: the features go there alone; the table is broadcast to every rank.
        mined = pass_over(module, loader, features, description="Mining neighbours", rank0_only=True)
        if rank() == 0:
            neighbors = knn(mined["features"], k, metric=metric)[0].to(device)
            torch.save(neighbors.cpu(), cache)
            rank_zero_info(f"NNM: mined top-{k} neighbours of {num_images} images, cached in {cache}")
    return broadcast(neighbors).cpu()
