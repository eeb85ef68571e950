"""TEMI: clustering heads on frozen pretrained features ("Exploring the Limits of Deep Image
Clustering using Pretrained Models", Adaloglou et al., BMVC 2023, arXiv:2303.17896).

The backbone is never trained: it embeds every training image once (`clusterlab.features`, cached
on disk), and only the heads learn, on those features. Before training, every image's k nearest
neighbours are mined once among them (cosine); each step then sees a batch of images x and, per
image, one of its neighbours x' drawn at random. Student heads h_s
and their teacher h_t, the students' moving average, assign clusters to both; each head's loss is
the weighted beta-PMI of `clusterlab.losses.temi` between one view's student and the other view's
teacher, with the cluster prior p~ a moving average of the teacher's batch marginals and the
weight w(x, x') the teacher heads' mean agreement on the pair (the teacher ensemble). The head with
the lowest loss is reported, as for every multi-head method here.

The paper's text is not bundled with this repository; where this file names a setting it is that
of the authors' code and its README command (beta 0.6, 50 neighbours, student and teacher
temperatures 0.1, teacher momentum 0.996, prior momentum 0.9, DINO's head with a 512-wide hidden
layer and a 256-wide bottleneck, AdamW at 1e-4).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterlab.callbacks.momentum import HasMomentumEncoder, MomentumEncoder
from clusterlab.data.views import Views
from clusterlab.distributed import gather
from clusterlab.errors import ConfigError
from clusterlab.features import DEFAULT_CACHE, digest, embed_once
from clusterlab.losses.temi import teacher_agreement, temi_loss
from clusterlab.methods.base import ClusteringMethod, FolderRecipe, LRSchedulerCallable, OptimizerCallable
from clusterlab.nn.heads import ProjectionHeads
from clusterlab.pretext import load_pretext_backbone, mine_for_training, resolve_pretext_checkpoint


class TEMI(ClusteringMethod, HasMomentumEncoder):
    """Student heads taught by their moving average to put each image with its pretrained neighbours.

    Args:
        num_clusters: C.
        backbone: the pretrained feature extractor, frozen here: a `clusterlab.nn.Pretrained`
            network, or the backbone of a SimCLR run named by `pretext_checkpoint`.
        views: the input the backbone embeds: their plain transform, without augmentation (TEMI
            trains on fixed embeddings; `Views()`: the images as they are).
        pretext_checkpoint: a SimCLR checkpoint (path or glob, "{seed}": this run's seed) whose
            backbone weights to load; None: the backbone's own weights.
        num_heads: heads trained side by side (the authors' README: 16; the paper reports 50).
        num_neighbors: k of the mined neighbours (50).
        beta: the exponent of beta-PMI (0.6; 1: the plain PMI).
        use_instance_weights: weigh each pair by the teachers' agreement w(x, x'); false: every
            pair counts 1 (the paper's ablation of the instance weighting).
        ensemble_weights: w averaged over all teacher heads (the "teacher ensemble"); false: each
            head weighted by its own teacher only.
        student_temperature, teacher_temperature: the softmax temperatures (0.1, 0.1).
        teacher_momentum: the teacher's moving-average momentum (0.996).
        prior_momentum: the cluster prior's moving-average momentum (0.9).
        hidden_dim, bottleneck_dim: the heads' widths (512, 256).
        optimizer: AdamW, lr 1e-4, weight decay 1e-4 in the authors' code.
        feature_cache: the folder the training images' features are stored in, under a hash of
            backbone, weights and images, so a later run reads them back; None: embedded once
            per fit, not stored.
    """

    # On a folder: heads on the features of a pretrained network (--backbone) or of the folder's
    # SimCLR pretext; 4 heads and AdamW at 1e-3 as in experiments/temi_digits.yaml (a CPU budget).
    # A folder run is a few hundred to two thousand steps: the teacher's momentum 0.99 (a memory of
    # ~100 steps) lets it move within them; at 0.996 a 100-step run of 48 photos put every image in
    # one cluster (docs/results.md, "Pretrained features").
    folder_recipe = FolderRecipe(
        views="clusterlab.data.views.Views",
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 1e-4}},
        sizes=lambda num_images, num_clusters: {
            "num_neighbors": max(1, min(50, num_images // (2 * num_clusters)))
        },
        args={"num_heads": 4, "teacher_momentum": 0.99},
        pretext_checkpoint=True,
        frozen_features=True,
    )

    def __init__(
        self,
        num_clusters: int,
        backbone: nn.Module,
        views: Views,
        pretext_checkpoint: str | None = None,
        num_heads: int = 16,
        num_neighbors: int = 50,
        beta: float = 0.6,
        use_instance_weights: bool = True,
        ensemble_weights: bool = True,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.1,
        teacher_momentum: float = 0.996,
        prior_momentum: float = 0.9,
        hidden_dim: int = 512,
        bottleneck_dim: int = 256,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        feature_cache: str | None = DEFAULT_CACHE,
    ) -> None:
        super().__init__(num_clusters, backbone, num_heads, optimizer, lr_scheduler)
        self.save_hyperparameters(ignore=["backbone", "views"])
        if not 0 < beta <= 1:
            raise ConfigError(f"TEMI: beta must be in (0, 1], not {beta}")
        self.views = views
        # Frozen: the heads learn, the features stay; in eval mode from the start (batch-norm
        # statistics as trained), whether or not anything later calls train() on the method.
        backbone.requires_grad_(False).eval()
        self.cluster_head = ProjectionHeads(
            backbone.out_dim, num_clusters, num_heads, hidden_dim, bottleneck_dim
        )
        self.momentum_encoder = nn.ModuleDict({"cluster_head": copy.deepcopy(self.cluster_head)})
        self.momentum_encoder.requires_grad_(False)
        # p~: each head's cluster prior, a moving average of its teacher's marginal over batches.
        self.register_buffer("prior", torch.full((num_heads, num_clusters), 1.0 / num_clusters))
        # The training images' features (N x D), embedded once in setup; not a buffer: DDP would
        # broadcast it every step, and a checkpoint need not hold what the weights recompute.
        self.train_features: Tensor | None = None
        self.eval_features: Tensor | None = None  # the same for the evaluation set of the fit

    def configure_callbacks(self) -> list:
        return [MomentumEncoder(self.hparams.teacher_momentum)]

    def train(self, mode: bool = True) -> TEMI:
        super().train(mode)
        self.backbone.eval()  # frozen: batch-norm statistics stay those of the pretrained weights
        return self

    # -- before training: the backbone's weights and the mined neighbours ----------------------

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return

        def load() -> Path | None:
            """The backbone's weights, then every training image's features, embedded once; returns
            the file the neighbours are cached beside: the features' (the pretext's checkpoint when
            the features are not stored)."""
            path = None
            if self.hparams.pretext_checkpoint is not None:
                path = resolve_pretext_checkpoint(self.hparams.pretext_checkpoint, "TEMI")
                load_pretext_backbone(path, self.backbone, "TEMI")  # a resumed run loads its own after
            self.to(self.trainer.strategy.root_device)
            data = self.trainer.datamodule
            images = data.train_set.images

            def step(batch: dict[str, Tensor]) -> dict[str, Tensor]:
                return {"features": self.backbone(self.plain(batch["image"]))}

            key = digest(self.backbone, self.views, images)
            features, stored = embed_once(
                self, data.train_eval_dataloader(), step, key, len(images), self.hparams.feature_cache
            )
            self.train_features = features.to(self.device)
            self.eval_features = self.train_features
            if data.eval_set is not data.train_set:  # another split: embedded once too (or read back)
                eval_key = digest(self.backbone, self.views, data.eval_set.images)
                if eval_key != key:
                    eval_features, _ = embed_once(
                        self,
                        data.val_dataloader(),
                        step,
                        eval_key,
                        len(data.eval_set),
                        self.hparams.feature_cache,
                    )
                    self.eval_features = eval_features.to(self.device)
            return stored or path

        mine_for_training(self, self.hparams.num_neighbors, load, embed=lambda: self.train_features)
        self.trainer.datamodule.train_on_indices()  # the steps read the table, not the pixels

    # -- a training step ------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        with torch.no_grad():  # the pretrained features of x and of its neighbour x', embedded in setup
            f = self.train_features[batch["index"]]
            f_neighbor = self.train_features[batch["neighbor_index"]]
            t, t_neighbor = (self.momentum_encoder["cluster_head"](v) for v in (f, f_neighbor))
        s, s_neighbor = self.cluster_head(f), self.cluster_head(f_neighbor)
        # Everything below is over the global batch: heads x (global B) x C.
        s, s_neighbor, t, t_neighbor = (
            gather(v.transpose(0, 1)).transpose(0, 1) for v in (s, s_neighbor, t, t_neighbor)
        )
        q_s, q_s_neighbor = (
            F.softmax(v.float() / self.hparams.student_temperature, -1) for v in (s, s_neighbor)
        )
        q_t, q_t_neighbor = (
            F.softmax(v.float() / self.hparams.teacher_temperature, -1) for v in (t, t_neighbor)
        )
        with torch.no_grad():  # p~ <- m p~ + (1 - m) (the teacher's marginal over both views)
            marginal = torch.cat([q_t, q_t_neighbor], 1).mean(1)
            self.prior.lerp_(marginal, 1 - self.hparams.prior_momentum)
            agreement = teacher_agreement(q_t, q_t_neighbor)  # heads x B
            if self.hparams.ensemble_weights:
                agreement = agreement.mean(0, keepdim=True).expand_as(agreement)
        per_head = torch.stack(
            [
                temi_loss(
                    q_s[h],
                    q_s_neighbor[h],
                    q_t[h],
                    q_t_neighbor[h],
                    self.prior[h],
                    agreement[h] if self.hparams.use_instance_weights else None,
                    self.hparams.beta,
                )
                for h in range(self.num_heads)
            ]
        )
        return self.objective({"temi": per_head.mean()}, head_losses=per_head)

    # -- evaluation during the fit: the heads on the features embedded in setup ---------------------

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """The evaluation set's clusters from its features embedded in setup, by index: the frozen
        backbone does not run again at every evaluation (outside a fit: the backbone runs)."""
        if self.eval_features is None:
            return super().validation_step(batch, batch_idx)
        with torch.no_grad():
            clusters = self.cluster_head(self.eval_features[batch["index"]]).argmax(-1).T
        self._evaluation.add(batch["index"], label=batch["label"], cluster=clusters)
        return None

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)  # a test set is read through the backbone

    def permute_clusters_(self, order: list[int] | Tensor) -> None:
        """The students' clusters, and with them the teachers' and the cluster prior's, so that a
        renumbered model trains on as it would have."""
        super().permute_clusters_(order)
        index = torch.as_tensor(order, dtype=torch.long)
        self.momentum_encoder["cluster_head"].permute_(index)
        with torch.no_grad():
            self.prior.copy_(self.prior[:, index.to(self.prior.device)])
