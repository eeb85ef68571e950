"""Semantic Contrastive Learning ("Deep Clustering by Semantic Contrastive Learning", Huang & Gong,
2021, arXiv:2103.02662), Algorithm 1.

No public code of SCL exists; the paper is the spec. Where it is silent or ambiguous, these are
the readings taken (each also commented where it is used):

- Views: q comes from a random view of the image and k from another ("a random mini-batch and its
  perturbed copy"), as in MoCo v2 [8], whose implementation the paper follows. Sec. 3.1's
  q_i = f(I_i) literally is `query_view: plain`.
- Initial pseudo labels: a random balanced partition ("given random partitions at the beginning of
  training", Fig. 2a); the semantic memory starts with random unit keys, as MoCo's queue does.
- Eq. 3's p~ is a fixed target of Eq. 4 (no gradient into it); Eq. 4's p is the softmax of the
  classifier's logits. The classifier takes the representation q itself: the paper writes cos()
  wherever it compares representations, so q is not L2-normalised. (On unit-length q the linear
  classifier's logits stay small and its argmax often departs from p~; on q itself it follows p~.
  Figures: docs/results.md, SCL, and "Measurements behind design choices".)
- Eq. 6: the weights are normalised over the (global) mini-batch (Sec. 4.2: "we re-weight the
  samples within the same mini-batches"); uniform while no label has changed. The counts are the
  target task's (the under-clustering task's when the target task is off), and one weight per
  sample multiplies the instance loss of every task: Eq. 7's inner sum is read as the sum over
  the clustering tasks.
- Multi-grained tasks: each task has its own linear projection, momentum projection, semantic
  memory, and, for the clustering tasks, its own classifier and pseudo labels. Instance-level
  over-clustering is Eq. 2 with every sample its own cluster: one queue of K keys, minus the
  sample's own older keys; it has no classifier.
- The memory of a C'-cluster task holds K // (C' - 1) keys per cluster (Sec. 4).
- "We followed [41] (ODC) to avoid extremely imbalanced cluster assignments": both of ODC's
  guards, the split of the largest cluster to refill a small one (see callbacks/scl.py) and the
  loss re-weighting by n_c^-0.5 (here on the concept loss, the classifier's, as ODC weights its
  classifier's). Without the first, every image can fall into one cluster; with the first alone,
  half of a class can keep a cluster of its own, too large for the refill to fire
  (figures: docs/results.md, SCL, and its "robust over seeds").
- The refresh runs at the start of each epoch from epoch 1 on (the weights at the end of the
  previous one), so that a resumed run refreshes exactly once per epoch.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from clusterlab.callbacks.momentum import HasMomentumEncoder, MomentumEncoder
from clusterlab.callbacks.scl import PseudoLabelled, PseudoLabelRefresh
from clusterlab.data.views import Views
from clusterlab.distributed import gather
from clusterlab.errors import ConfigError
from clusterlab.losses.scl import (
    cluster_size_weights,
    concept_loss,
    contrastive_set,
    hard_sample_weights,
    instance_loss,
    memory_logits,
)
from clusterlab.methods.base import ClusteringMethod, FolderRecipe, LRSchedulerCallable, OptimizerCallable
from clusterlab.methods.simclr import PHOTO_VIEWS
from clusterlab.nn.heads import ClusterHead, ClusterHeads, KMeansHead, kmeans_start
from clusterlab.nn.init import redraw_
from clusterlab.nn.memory import KeyQueues, SampleTable
from clusterlab.seeding import derive_seed

CLUSTERING, UNDER, OVER = "clustering", "under_clustering", "over_clustering"
_PARTITION_STREAM = 0x5C1  # derive_seed stream of the initial random partition (and each restart's)


class MemoryHead(ClusterHead):
    """The target task's clusters without concept discrimination: the memory's assignment p~ of q
    (Eq. 3). The memory is SCL's `semantic_memory` (held, not owned: its keys are in the checkpoint
    once), and SCL renumbers it (`SCL.permute_clusters_`), so there is nothing of its own to renumber."""

    def __init__(self, memory: KeyQueues, temperature: float) -> None:
        super().__init__()
        self._memory = (memory,)  # a tuple: not a submodule of the head
        self.temperature = temperature

    def forward(self, q: Tensor) -> Tensor:
        return memory_logits(q, self._memory[0].keys, self.temperature)[None]

    def permute_(self, order: Tensor) -> None:
        # Nothing of its own to renumber: its logits are the memory's clusters, which
        # SCL.permute_clusters_ renumbers (keys, index, pointer) for the memory's other readers too.
        return None


def scl_tasks(
    num_clusters: int,
    clustering_task: bool,
    under_clustering: bool,
    over_clustering: bool,
    use_instance_loss: bool,
    use_concept_loss: bool,
) -> tuple[dict[str, int], list[str]]:
    """The clustering tasks (with pseudo labels, Eq. 5) and their cluster numbers, in table order,
    and every task (the over-clustering one last); refuses combinations that train nothing."""
    if not (use_instance_loss or use_concept_loss):
        raise ConfigError("SCL needs use_instance_loss, use_concept_loss or both")
    if under_clustering and num_clusters // 2 < 2:
        rank_zero_warn(
            f"SCL: {num_clusters} clusters leave no under-clustering task (C // 2 < 2); it is left out"
        )
        under_clustering = False
    clustering_tasks = {CLUSTERING: num_clusters, UNDER: num_clusters // 2}
    enabled = {CLUSTERING: clustering_task, UNDER: under_clustering}
    task_clusters = {t: c for t, c in clustering_tasks.items() if enabled[t]}
    tasks = [*task_clusters, *([OVER] if over_clustering else [])]
    if not tasks:
        raise ConfigError("SCL needs at least one of clustering_task, under_clustering, over_clustering")
    if not task_clusters and use_concept_loss and not use_instance_loss:
        raise ConfigError("use_concept_loss needs a clustering task (clustering_task or under_clustering)")
    return task_clusters, tasks


def refuse_unsupported(
    restarts: int,
    final_momentum: float | None,
    clustering_task: bool,
    use_concept_loss: bool,
    partition_init_epoch: int | None,
) -> None:
    """ConfigErrors for clusterlab's additions to SCL (restarts, the k-means start) where they cannot run."""
    if restarts > 1 and final_momentum is not None:
        raise ConfigError("SCL: restarts with a final_momentum are not supported (one momentum schedule)")
    if restarts > 1 and not (clustering_task and use_concept_loss):
        raise ConfigError("SCL: restarts are ranked by the clustering task's concept loss; keep both on")
    if partition_init_epoch is not None and not (partition_init_epoch >= 1 and use_concept_loss):
        raise ConfigError(
            f"SCL: partition_init_epoch {partition_init_epoch}: it starts the classifiers from k-means "
            "at a refresh, so it needs use_concept_loss and an epoch >= 1 (the first refresh)"
        )


class SCL(ClusteringMethod, PseudoLabelled, HasMomentumEncoder):
    """Cross-cluster instance discrimination with a semantic memory, plus concept discrimination
    by a linear classifier that learns the memory's cluster structure; clusters are the argmax of
    the target task's classifier, so prediction is online.

    Args:
        num_clusters: C, the number of clusters.
        backbone: the encoder's feature extractor (the momentum encoder is a copy of it).
        views: the transformations T (MoCo v2's for colour images).
        projection_dim: dimension of each task's representation q (a linear layer on the backbone).
        temperature: tau of Eqs. 1 and 3 (0.1).
        memory_size: K: a C'-cluster task's memory holds K // (C' - 1) keys per cluster (4096;
            8192 on Tiny-ImageNet); the instance-level task's memory holds K keys.
        momentum: m of the momentum encoder update (0.9).
        final_momentum: None: m is constant; a value: m follows a cosine from `momentum` to it.
        clustering_task, under_clustering, over_clustering: the target task (C clusters), the
            under-clustering task (C // 2 clusters) and instance-level over-clustering (Fig. 4).
            Without the target task, clusters come from k-means on the backbone features, refitted
            at every evaluation (Sec. 4.2: "K-means was adopted for the models which didn't
            explicitly learn clusters in ground-truth number").
        use_instance_loss: the instance discrimination term L_mi (Eqs. 1, 7).
        cross_cluster: Eq. 2's contrastive set (all queues but the sample's own). False: "all the
            memory bank were concatenated as the contrastive set for every sample" (Fig. 3).
        use_concept_loss: concept discrimination L_xent (Eqs. 3-4). False: no classifier; pseudo
            labels and clusters are the argmax of the memory's assignment p~ (Fig. 3).
        use_hard_sample_weights: Eq. 6's weights in Eq. 7; False: the plain batch mean (Table 3).
        imbalance_guard, min_cluster_fraction: ODC's refill of clusters smaller than this fraction
            of N / C, by splitting the largest (see `callbacks.PseudoLabelRefresh`).
        size_reweighting: ODC's other guard: each sample's concept loss weighs n_c^-0.5, n_c the
            size of its pseudo label's cluster (`losses.scl.cluster_size_weights`). The paper
            follows ODC "to avoid extremely imbalanced cluster assignments" without saying which
            of its two guards; ODC uses both. False: the plain mean of Eq. 4.
        query_view: "augmented" (MoCo v2) or "plain": q from the un-augmented image (Sec. 3.1 read
            literally).
        partition_init_epoch: None (the paper): the partition starts random (Fig. 2a) and follows
            the classifiers. E >= 1: at the refresh before epoch E (of each restart), each clustering
            task's classifier is set to a spherical k-means of its q over the training set
            (`clusterlab.nn.heads.kmeans_start`, as CC's head_init_epoch), so the refresh's labels
            (Eq. 5) are k-means' partition. Not in the paper: ODC, whose guards SCL follows, starts
            its labels from k-means of the network's features.
        restarts: R runs of max_epochs / R epochs one after another, each from new random weights,
            memories and partition; the one whose clustering task's concept loss (Eq. 4) is
            lowest over its last 10 epochs is kept (`ClusteringMethod`). Not in the paper: k-means'
            remedy for a run that settles in a poor partition. 1: the paper's single run.
        optimizer: SGD, lr 0.03, weight decay 5e-4 in the paper (momentum 0.9 as in MoCo v2).
        lr_scheduler: cosine over the 200 epochs in the paper.
    """

    # On a folder of photos: SimCLR's views, SGD 0.03 with a cosine schedule as the digits config,
    # a memory of half the images (at most the paper's 4096, at least one key per cluster), and
    # the under-clustering task (K // 2 clusters) from K = 4 on.
    folder_recipe = FolderRecipe(
        views=PHOTO_VIEWS["class_path"],
        view_args=PHOTO_VIEWS["init_args"],
        sizes=lambda num_images, num_clusters: {
            "memory_size": max(num_clusters, min(4096, num_images // 2)),
            "under_clustering": num_clusters >= 4,
        },
        optimizer={
            "class_path": "torch.optim.SGD",
            "init_args": {"lr": 0.03, "momentum": 0.9, "weight_decay": 0.0005},
        },
        lr_scheduler=lambda epochs: {
            "class_path": "torch.optim.lr_scheduler.CosineAnnealingLR",
            "init_args": {"T_max": max(1, epochs)},
        },
    )

    def __init__(
        self,
        num_clusters: int,
        backbone: nn.Module,
        views: Views,
        projection_dim: int = 128,
        temperature: float = 0.1,
        memory_size: int = 4096,
        momentum: float = 0.9,
        final_momentum: float | None = None,
        clustering_task: bool = True,
        under_clustering: bool = True,
        over_clustering: bool = True,
        use_instance_loss: bool = True,
        cross_cluster: bool = True,
        use_concept_loss: bool = True,
        use_hard_sample_weights: bool = True,
        imbalance_guard: bool = True,
        min_cluster_fraction: float = 0.15,
        size_reweighting: bool = True,
        query_view: Literal["augmented", "plain"] = "augmented",
        partition_init_epoch: int | None = None,
        restarts: int = 1,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_clusters, backbone, 1, optimizer, lr_scheduler, restarts=restarts)
        refuse_unsupported(restarts, final_momentum, clustering_task, use_concept_loss, partition_init_epoch)
        self.save_hyperparameters()
        self.task_clusters_by_name, self.tasks = scl_tasks(
            num_clusters,
            clustering_task,
            under_clustering,
            over_clustering,
            use_instance_loss,
            use_concept_loss,
        )
        self.views = views
        dim = backbone.out_dim

        # f_theta: the backbone and one linear projection per task ("independent feature spaces
        # constructed by single linear layers on top of the backbone", Sec. 4).
        self.projections = nn.ModuleDict({t: nn.Linear(dim, projection_dim) for t in self.tasks})
        # phi = {W; B} of each clustering task (Eq. 4): the target task's is the cluster head, the
        # under-clustering task's a classifier of its own (made in this order, the tasks' table order).
        if use_concept_loss and clustering_task:
            self.cluster_head = ClusterHeads(projection_dim, num_clusters)
        self.classifiers = nn.ModuleDict(
            {
                t: nn.Linear(projection_dim, c)
                for t, c in self.task_clusters_by_name.items()
                if t != CLUSTERING
            }
            if use_concept_loss
            else {}
        )
        # f_theta~: same structure, its own parameters, moved only by the momentum update.
        self.momentum_encoder = nn.ModuleDict(
            {"backbone": copy.deepcopy(backbone), "projections": copy.deepcopy(self.projections)}
        ).requires_grad_(False)
        # M = {M_1, ..., M_C'}: K / (C' - 1) keys per cluster (Eq. 2); one queue of K for instances.
        self.semantic_memory = nn.ModuleDict(
            {
                t: KeyQueues(c, memory_size // (c - 1), projection_dim)
                for t, c in self.task_clusters_by_name.items()
            }
        )
        if over_clustering:
            self.semantic_memory[OVER] = KeyQueues(1, memory_size, projection_dim)
        # y_i per clustering task and s_i (Eq. 6), keyed by training-set index; sized in setup().
        self.sample_table = SampleTable(len(self.task_clusters_by_name))
        # The weights of Eq. 6 follow the target task's label changes (the under-clustering
        # task's without it); with instance-level discrimination only, there are no labels.
        self.weight_task = 0 if self.task_clusters_by_name else None
        if not clustering_task:  # clusters are k-means centres of the backbone features
            self.cluster_head = KMeansHead(num_clusters, dim)
        elif not use_concept_loss:  # clusters are the memory's assignment
            self.cluster_head = MemoryHead(self.semantic_memory[CLUSTERING], temperature)

    # What ranks restarts (`restarts`): on digits, the runs caught in a poor partition (a digit's
    # styles in a small cluster beside a cluster of two digits, ACC 0.85-0.92) ended with a mean
    # concept loss of 0.275-0.464 over their last 10 epochs, the 16 at ACC 0.951-0.961 with
    # 0.234-0.249; the total loss (6.01-6.24) does not tell them apart.
    restart_criterion = f"{CLUSTERING}/concept"

    @property
    def task_clusters(self) -> list[int]:
        """C' of each clustering task, in the order of `sample_table`'s rows."""
        return list(self.task_clusters_by_name.values())

    def configure_callbacks(self) -> list:
        return [
            MomentumEncoder(self.hparams.momentum, self.hparams.final_momentum),
            PseudoLabelRefresh(self.hparams.imbalance_guard, self.hparams.min_cluster_fraction),
        ]

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        data = self.trainer.datamodule
        if getattr(data, "train_set", None) is None:
            raise TypeError(
                "SCL trains from a ClusterDataModule: its pseudo labels and weights are kept per "
                "training-set index, and refreshed over its train_eval_dataloader()"
            )
        num_samples = len(data.train_set)
        if len(self.sample_table) != num_samples:  # a resumed run then loads the saved table over it
            generator = torch.Generator().manual_seed(derive_seed(_PARTITION_STREAM))
            self.sample_table.reset(num_samples, self.task_clusters, generator)

    def reinitialise_(self, restart: int) -> None:
        """A restart: new weights (the momentum encoder their copy again), memories of random keys,
        and a new random balanced partition, trained on in the restart's first epoch as in the run's
        first (no refresh before it)."""
        redraw_(self)
        self.momentum_encoder["backbone"].load_state_dict(self.backbone.state_dict())
        self.momentum_encoder["projections"].load_state_dict(self.projections.state_dict())
        for memory in self.semantic_memory.values():
            memory.reset_()
        generator = torch.Generator().manual_seed(derive_seed(_PARTITION_STREAM, restart))
        self.sample_table.reset(len(self.sample_table), self.task_clusters, generator)
        self.sample_table.epoch.fill_(self.current_epoch + 1)

    @torch.no_grad()
    def prepare_refresh(self) -> None:
        """At `partition_init_epoch` (of each restart), before the refresh predicts: every clustering
        task's classifier := the spherical k-means of its q over the training set, a logit per
        centre, cos(q, c_k) |q| / (tau |q|_median); its argmax, the refresh's labels, is k-means'.
        Rank 0 clusters, every rank sets the same weights (kmeans_start broadcasts them)."""
        if self.epoch_in_restart != self.hparams.partition_init_epoch:
            return

        def representations(batch: dict[str, Tensor]) -> dict[str, Tensor]:
            h = self.backbone(self.plain(batch["image"]))
            return {task: self.projections[task](h).float() for task in self.task_clusters_by_name}

        passed = self.pass_over_training_set(representations)
        for task, clusters in self.task_clusters_by_name.items():
            q, tau = passed.get(task), self.hparams.temperature  # q on rank 0 only
            (start,) = kmeans_start(q, self.hparams.projection_dim, clusters, 1, tau, self.device)
            classifier = self.cluster_head.heads[0] if task == CLUSTERING else self.classifiers[task]
            classifier.weight.copy_(start)
            classifier.bias.zero_()
        rank_zero_info(f"SCL: epoch {self.current_epoch}: classifiers set to k-means of q (the partition)")

    # -- training: Algorithm 1 ----------------------------------------------------------------

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = batch["image"]
        # A random mini-batch and its perturbed copy.
        x = self.views(images) if self.hparams.query_view == "augmented" else self.plain(images)
        x_perturbed = self.views(images)
        h = self.backbone(x)
        with torch.no_grad():
            h_perturbed = self.momentum_encoder["backbone"](x_perturbed)

        # The losses are over the global batch; the table is the same on every rank.
        index = gather(batch["index"].to(self.device))
        changes = self.sample_table.changes[self.weight_task][index] if self.weight_task is not None else None
        weights = (
            hard_sample_weights(changes)
            if self.hparams.use_hard_sample_weights and changes is not None
            else None
        )
        tau = self.hparams.temperature

        terms = {}
        for row, task in enumerate(self.tasks):
            q_local = self.projections[task](h)
            q = gather(q_local)  # q_i = f_theta(I_i); Eqs. 1 and 3 compare representations by cosine
            with torch.no_grad():
                k = gather(F.normalize(self.momentum_encoder["projections"][task](h_perturbed), dim=1))  # k_i
            memory = self.semantic_memory[task]
            if task == OVER:  # every sample its own cluster
                own, queue, memory_owner = index, torch.zeros_like(index), memory.index.flatten()
            else:
                own = queue = self.sample_table.labels[row][index]  # y_i
                memory_owner = memory.queue_of_slot()
            if self.hparams.use_instance_loss:
                negatives = contrastive_set(memory_owner, own)  # Q_i, Eq. 2
                if not self.hparams.cross_cluster:
                    negatives = torch.ones_like(negatives)
                keys = memory.flat_keys()  # a copy: the memory moves on below, the loss keeps these
                terms[f"{task}/instance"] = instance_loss(q, k, keys, negatives, tau, weights)  # Eqs. 1, 7
            if self.hparams.use_concept_loss and task != OVER:
                target = memory_logits(q.detach(), memory.keys, tau).softmax(1)  # p~, Eq. 3
                logits = gather(self.classifier_logits(task, q_local))  # p = W^T q + B
                size_weights = None
                if self.hparams.size_reweighting:  # ODC's n_c^-0.5, n_c over the whole training set
                    sizes = self.sample_table.cluster_sizes(row, logits.shape[1])  # once per refresh
                    size_weights = cluster_size_weights(own, sizes)
                terms[f"{task}/concept"] = concept_loss(logits, target, size_weights)  # L_xent, Eq. 4
            # "After every backward pass, k_i enqueues to M_{y_i} with the oldest one inside
            # removed" (Sec. 3.1): the gathered keys, the same on every rank, in batch order.
            memory.enqueue(k, queue, index)
        return self.objective(terms)  # L_mi + L_xent (Sec. 3.2)

    # -- cluster logits -----------------------------------------------------------------------

    def classifier_logits(self, task: str, q: Tensor) -> Tensor:
        """p = W^T q + B of one clustering task's classifier (Eq. 4), on the representation q itself:
        the paper normalises only inside its cosine similarities."""
        return self.cluster_head(q)[0] if task == CLUSTERING else self.classifiers[task](q)

    def task_logits(self, task: str, q: Tensor) -> Tensor:
        """p of one clustering task: its classifier's (Eq. 4); without concept discrimination, the
        memory's assignment (Eq. 3) in its place."""
        if self.hparams.use_concept_loss:
            return self.classifier_logits(task, q)
        return memory_logits(q, self.semantic_memory[task].keys, self.hparams.temperature)

    @torch.no_grad()
    def task_outputs(self, images: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(logits, q) of every clustering task for a batch of uint8 images: Eq. 5's input."""
        h = self.backbone(self.plain(images))
        outputs = []
        for task in self.task_clusters_by_name:
            q = self.projections[task](h)
            outputs.append((self.task_logits(task, q), F.normalize(q, dim=1)))
        return outputs

    def cluster_features(self, x: Tensor) -> Tensor:
        """The target task's representation q, which its head reads ("in test time, the assignments
        on 'clustering' tasks were used for evaluation"); without that task, the L2-normalised
        backbone features, which the k-means head clusters."""
        if self.cluster_head.fitted:
            return F.normalize(self.backbone(x), dim=1)
        return self.projections[CLUSTERING](self.backbone(x))

    def permute_clusters_(self, order: list[int] | Tensor) -> None:
        """The head's clusters, and the target task's memory, one queue per cluster (its keys, their
        owners and write pointers), so that p~ (Eq. 3) follows the new numbers. The pseudo-label
        table keeps the old numbers: the renumbered model is for prediction, not further training."""
        super().permute_clusters_(order)
        if CLUSTERING in self.task_clusters_by_name:
            memory = self.semantic_memory[CLUSTERING]
            index = torch.as_tensor(order, dtype=torch.long)
            with torch.no_grad():
                for buffer in (memory.keys, memory.index, memory.pointer):
                    buffer.copy_(buffer[index.to(buffer.device)])
