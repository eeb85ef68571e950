"""Deep Comprehensive Correlation Mining ("Deep Comprehensive Correlation Mining for Image Clustering",
Wu et al., ICCV 2019, arXiv:1904.06925), Algorithm 1."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from clusterlab.callbacks.momentum import MomentumEncoder
from clusterlab.data.views import Views
from clusterlab.distributed import gather
from clusterlab.errors import ConfigError
from clusterlab.losses.dccm import (
    mutual_information_loss,
    pseudo_graph,
    pseudo_graph_loss,
    pseudo_label_loss,
    pseudo_labels,
    triplet_pairs,
)
from clusterlab.methods.base import ClusteringMethod, FolderRecipe, LRSchedulerCallable, OptimizerCallable
from clusterlab.metrics import graph_bcubed
from clusterlab.nn.heads import ClusterHeads, LocalDiscriminator
from clusterlab.nn.init import redraw_
from clusterlab.seeding import derive_seed

_PAIR_DRAW = 0xDCC  # keeps the negatives' random stream apart from the per-step reseeding's


def reinitialised(module: nn.Module) -> nn.Module:
    """A copy of `module` with every layer's parameters (and running statistics) drawn afresh."""
    return redraw_(copy.deepcopy(module))


class DCCM(ClusteringMethod):
    """Pseudo-graph and pseudo-label supervision, on the original and on slightly transformed
    images (local robustness), plus triplet mutual information between deep and shallow
    features. Clusters are the argmax of the prediction (Eq. 7), so prediction is online.

    Args:
        num_clusters: K, the number of clusters.
        backbone: f up to its feature vector; it names the shallow map M (`with_shallow=True`).
            `clusterlab.nn.DCCMNet` is the authors' CIFAR net.
        views: the small perturbations G (`GeometricViews`); `plain` gives the original images.
        graph_threshold: thres_1 of the pseudo-graph (Eq. 2), 0.95.
        label_threshold: thres_2 of the confident pseudo labels (Eq. 8), 0.9.
        alpha: weight of the pseudo-label terms (Eqs. 10, 12, 15), 5.
        beta: weight of the triplet mutual information (Eq. 15): 0.1 in the paper, 0.05 in the
            authors' code.
        use_pseudo_graph_loss, use_pseudo_label_loss, use_local_robustness,
            use_mutual_information_loss: switch each part of Eq. 15 on or off. The rows of the
            paper's Table 3: M1 (L_PG) has only use_pseudo_graph_loss; M2 adds
            use_local_robustness (the same terms on the transformed images); M3 adds
            use_pseudo_label_loss; M4 (the default) adds use_mutual_information_loss.
        original_images: the pseudo-graph and pseudo-label terms on the original images too, as
            Eq. 15 says (L^_PG = L_PG + L'_PG). The authors' code trains on the transformed images
            only (false).
        pseudo_label_criterion: l_l of Eq. 9: "cross_entropy" (paper) or "bce" (authors' code).
        num_negatives: pseudo-graph negatives drawn at random per anchor for the mutual
            information (the authors' code: 2).
        discriminator_dim: width of the 1x1-conv discriminator T (512 in the paper).
        chunk_size: None: every step computes its targets (W, y, V) from its own batch, as the
            paper's Algorithm 1. A number: the authors' schedule: the targets of a chunk of that
            many images are computed once, without gradient, when the chunk starts; then the chunk
            is visited `chunk_repeats` times in shuffled batches, each batch `chunk_batch_repeats`
            times with new views (the authors' code: 1000 images, 10 visits, 2 views per batch).
        num_heads: cluster heads trained side by side on the same backbone, each with its own
            pseudo-graph, pseudo labels and discriminator T; the run reports the head whose own
            unsupervised loss (its share of Eq. 15) was lowest over the last epoch. 1 in the paper.
        separate_backbones: each head on its own backbone, initialised apart (not in the paper):
            num_heads independent restarts of the whole network trained side by side, the one
            with the lowest loss kept, as k-means keeps the best of its restarts. Heads on one
            backbone end in one partition, so their losses cannot tell a crossed partition from
            a good one; restarts can. Costs num_heads times the compute of one network.
        combine_heads: "select": the run is its selected head's (restart's) partition. "vote":
            the heads' vote (`ClusteringMethod`), each restart's clusters renamed after the
            selected one's by the targets z of the last epoch: among restarts that all found the
            digits, the lowest loss is no better than a coin toss, and the vote outvotes a
            restart's own mistakes. Not in the paper.
        target_momentum: None: the targets W, y, V of a step come from the network being trained
            (the paper). A value m: from a moving average of its backbone and heads,
            theta~ <- m theta~ + (1 - m) theta after every step (a mean teacher: Tarvainen and
            Valpola, NeurIPS 2017, arXiv:1703.01780; not in the DCCM paper), so that one step
            cannot move the targets it is trained towards.
        logit_norm: BatchNorm on the logits before the softmax, as the authors' net. It keeps
            the predictions from collapsing onto one cluster; turn it off where the loss must not
            depend on how the batch is split (the distributed tests on CPU).
        optimizer: RMSprop, lr 1e-4 in the paper (the code: alpha 0.9).
        lr_scheduler: none in the paper.
    """

    # On a folder of photos: the small geometric perturbations, a narrower discriminator T than
    # the paper's 512 (the folder command's CPU budget), RMSprop as the digits config.
    folder_recipe = FolderRecipe(
        views="clusterlab.data.views.GeometricViews",
        args={"discriminator_dim": 128},
        optimizer={"class_path": "torch.optim.RMSprop", "init_args": {"lr": 0.001, "alpha": 0.9}},
    )

    def __init__(
        self,
        num_clusters: int,
        backbone: nn.Module,
        views: Views,
        graph_threshold: float = 0.95,
        label_threshold: float = 0.9,
        alpha: float = 5.0,
        beta: float = 0.1,
        use_pseudo_graph_loss: bool = True,
        use_pseudo_label_loss: bool = True,
        use_local_robustness: bool = True,
        use_mutual_information_loss: bool = True,
        original_images: bool = True,
        pseudo_label_criterion: Literal["cross_entropy", "bce"] = "cross_entropy",
        num_negatives: int = 2,
        discriminator_dim: int = 512,
        chunk_size: int | None = None,
        chunk_repeats: int = 10,
        chunk_batch_repeats: int = 2,
        logit_norm: bool = True,
        num_heads: int = 1,
        separate_backbones: bool = False,
        combine_heads: str = "select",
        target_momentum: float | None = None,
        optimizer: OptimizerCallable = torch.optim.RMSprop,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(num_clusters, backbone, num_heads, optimizer, lr_scheduler, combine_heads)
        self.save_hyperparameters()
        if not (use_pseudo_graph_loss or use_pseudo_label_loss or use_mutual_information_loss):
            raise ConfigError(
                "DCCM needs at least one of use_pseudo_graph_loss, use_pseudo_label_loss, "
                "use_mutual_information_loss"
            )
        if (use_pseudo_graph_loss or use_pseudo_label_loss) and not (original_images or use_local_robustness):
            raise ConfigError(
                "original_images=false and use_local_robustness=false leave the pseudo-graph and "
                "pseudo-label terms no images to train on"
            )
        self.views = views
        # The authors' last layer: Linear(64 -> K) - BN, then the softmax of Eq. 1. No bias before
        # the BN: it would have no gradient but rounding noise, which RMSprop scales up to full steps.
        self.cluster_head = ClusterHeads(backbone.out_dim, num_clusters, num_heads, logit_norm=logit_norm)
        # The current chunk's targets (chunk_size set): its training-set indices, sorted, and each
        # head's predictions of its original images when it started. Buffers: a run resumed inside
        # a chunk continues with the targets it had.
        self._all_labelled = False  # set in setup
        self.register_buffer("chunk_rows", torch.zeros(chunk_size or 0, dtype=torch.long))
        self.register_buffer("chunk_probs", torch.zeros(num_heads, chunk_size or 0, num_clusters))
        # Heads 1.. on their own backbones (separate_backbones), drawn afresh: restarts, not copies.
        # Empty otherwise (no state-dict keys): every head reads the one backbone.
        restarts = num_heads - 1 if separate_backbones else 0
        self.restart_backbones = nn.ModuleList(reinitialised(backbone) for _ in range(restarts))
        if separate_backbones and target_momentum is not None:
            raise ConfigError("DCCM: separate_backbones and target_momentum cannot be combined yet; drop one")
        if target_momentum is not None and not 0.0 <= target_momentum < 1.0:
            raise ConfigError(f"DCCM: target_momentum must be in [0, 1), not {target_momentum}")
        # theta~ of the targets (target_momentum set): a copy moved only by the moving average.
        self.momentum_encoder = (
            nn.ModuleDict(
                {"backbone": copy.deepcopy(backbone), "cluster_head": copy.deepcopy(self.cluster_head)}
            ).requires_grad_(False)
            if target_momentum is not None
            else None
        )
        self.discriminators = (
            nn.ModuleList(
                LocalDiscriminator(num_clusters, backbone.shallow_dim, discriminator_dim)
                for _ in range(num_heads)
            )
            if use_mutual_information_loss
            else None
        )

    def configure_callbacks(self) -> list:
        if self.momentum_encoder is None:
            return []
        return [MomentumEncoder(self.hparams.target_momentum)]

    def target_logits(self, x: Tensor) -> list[Tensor]:
        """Y of every head for the targets W, y, V, without gradient: the moving average's when
        target_momentum is set, else the trained network's."""
        with torch.no_grad():
            if self.momentum_encoder is None:
                return self.forward_with_shallow(x)[0]
            features = self.momentum_encoder["backbone"](x)
            return [head(features) for head in self.momentum_encoder["cluster_head"].heads]

    def head_backbone(self, h: int) -> nn.Module:
        """The backbone head h reads: the one backbone, or with separate_backbones its own."""
        return self.backbone if h == 0 or not self.restart_backbones else self.restart_backbones[h - 1]

    def backbones(self) -> list[nn.Module]:
        return [self.backbone, *self.restart_backbones]

    def forward_with_shallow(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Y of every head (pre-softmax output, B x K each) and the shallow feature map M of the
        same forward pass: one M for all heads, or with separate_backbones one per head."""
        if not self.restart_backbones:
            features, shallow = self.backbone(x, with_shallow=True)
            return [head(features) for head in self.cluster_head.heads], [shallow]
        outputs = [backbone(x, with_shallow=True) for backbone in self.backbones()]
        return [head(f) for head, (f, _) in zip(self.cluster_head.heads, outputs)], [m for _, m in outputs]

    def cluster_features(self, x: Tensor) -> Tensor:
        # The selected head's backbone: `assign` reads the selected head only.
        return self.head_backbone(self.selected_head)(x)

    def cluster_logits(self, x: Tensor) -> Tensor:
        if not self.restart_backbones:
            return super().cluster_logits(x)
        return torch.stack(self.forward_with_shallow(x)[0])

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        return self.cluster_features(self.plain(images))

    def setup(self, stage: str) -> None:
        # Whether every training sample has a label (for the logged BCubed diagnostics), read once
        # from the host's copy of the labels rather than per batch from the device's.
        labels = getattr(getattr(self.trainer.datamodule, "train_set", None), "labels", None)
        self._all_labelled = labels is not None and bool((torch.as_tensor(labels) >= 0).all())
        if stage == "fit" and self.hparams.chunk_size:
            self.trainer.datamodule.set_chunks(
                self.hparams.chunk_size, self.hparams.chunk_repeats, self.hparams.chunk_batch_repeats
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images = batch["image"]
        # Lines 4-5 of Algorithm 1: predictions of the original images, and from them, over the
        # global batch, the pseudo-graph W (Eq. 2) and the confident pseudo labels y, V (Eqs. 7-8).
        on_original = self.hparams.original_images or (
            self.hparams.use_mutual_information_loss and not self.hparams.use_local_robustness
        )
        logits = transformed = None
        # The original images, where a forward pass needs them (not with the chunks' own targets
        # and no original-image terms).
        plain = self.views.plain(images) if on_original or not self.hparams.chunk_size else None
        online_targets = not self.hparams.chunk_size and self.momentum_encoder is None
        if on_original or online_targets:
            with torch.set_grad_enabled(on_original):
                logits, shallow = self.forward_with_shallow(plain)
            logits = [gather(y) for y in logits]
        if self.hparams.chunk_size:  # the authors' schedule: targets from the chunk's start
            probs = self.chunk_targets(batch)
        elif online_targets:
            probs = [y.detach().float().softmax(1) for y in logits]  # z, Eq. 1
        else:  # z, Eq. 1, of the moving average (target_momentum)
            probs = [gather(y).float().softmax(1) for y in self.target_logits(plain)]
        if self.hparams.use_local_robustness:  # x' = G x
            transformed, shallow = self.forward_with_shallow(self.views(images))
            transformed = [gather(y) for y in transformed]
        if self.hparams.use_mutual_information_loss:
            # The pairs' random scores: drawn once per step, the same for every head.
            shallow = [gather(m) for m in shallow]
            scores = self.pair_scores(gather(batch["index"]), batch_idx)

        self.record_head_assignments(torch.stack(probs))  # the vote's alignment (combine_heads "vote")
        per_head, class_labels = [], gather(batch["label"])  # labels: for the logged diagnostics only
        for h in range(self.num_heads):
            graph = pseudo_graph(probs[h], self.hparams.graph_threshold)
            labels, confident = pseudo_labels(probs[h], self.hparams.label_threshold)
            terms = self.head_terms(
                graph,
                labels,
                confident,
                logits[h] if self.hparams.original_images else None,
                transformed[h] if transformed is not None else None,
            )
            if self.hparams.use_mutual_information_loss:  # beta L_MI, Eq. 14, on the images trained on
                deep = transformed[h] if transformed is not None else logits[h]
                terms["mutual_information"] = self.hparams.beta * self.triplet_mutual_information(
                    self.discriminators[h], deep, shallow[h if len(shallow) > 1 else 0], graph, scores
                )
            per_head.append(terms)
            self.log_diagnostics(h, probs[h], graph, confident, class_labels)
        head_losses = torch.stack([torch.stack(list(terms.values())).sum() for terms in per_head])
        terms = {name: torch.stack([t[name] for t in per_head]).mean() for name in per_head[0]}
        return self.objective(terms, head_losses)  # L_DCCM, Eq. 15 (the mean over the heads)

    def head_terms(
        self,
        graph: Tensor,
        labels: Tensor,
        confident: Tensor,
        logits: Tensor | None,
        transformed: Tensor | None,
    ) -> dict[str, Tensor]:
        """One head's pseudo-graph and pseudo-label terms, from its targets W, y, V: on the
        original images' logits and on the transformed images' (either None when switched off)."""
        alpha, criterion = self.hparams.alpha, self.hparams.pseudo_label_criterion
        terms = {}
        if logits is not None:  # L_CDS = L_PG + alpha L_PL, Eq. 10
            if self.hparams.use_pseudo_graph_loss:
                terms["pseudo_graph"] = pseudo_graph_loss(logits, graph)  # Eq. 3
            if self.hparams.use_pseudo_label_loss:
                terms["pseudo_label"] = alpha * pseudo_label_loss(
                    logits, labels, confident, criterion
                )  # Eq. 9
        if transformed is not None:  # L_LR = L'_PG + alpha L'_PL on x' = G x, W, y, V of x: Eq. 12
            if self.hparams.use_pseudo_graph_loss:
                terms["pseudo_graph_transformed"] = pseudo_graph_loss(transformed, graph)
            if self.hparams.use_pseudo_label_loss:
                terms["pseudo_label_transformed"] = alpha * pseudo_label_loss(
                    transformed, labels, confident, criterion
                )
        return terms

    def chunk_targets(self, batch: dict[str, Tensor]) -> list[Tensor]:
        """z of the global batch's original images, every head's, as predicted when their chunk
        started (one N x K per head). The first batch of a chunk brings the chunk (each process its
        share): its predictions are made then, without gradient, in training mode as the authors'
        code makes them."""
        if "chunk_index" in batch:
            logits = self.target_logits(self.views.plain(batch["chunk_image"]))
            index = gather(batch["chunk_index"].to(self.device))
            probs = torch.stack([gather(y.float().softmax(1)) for y in logits])
            order = index.argsort()
            self.chunk_rows.copy_(index[order])
            self.chunk_probs.copy_(probs[:, order])
        index = gather(batch["index"].to(self.device))
        return list(self.chunk_probs[:, torch.searchsorted(self.chunk_rows, index)])

    def triplet_mutual_information(
        self,
        discriminator: nn.Module,
        deep: Tensor,
        shallow: Tensor,
        graph: Tensor,
        scores: Tensor,
    ) -> Tensor:
        """L_MI, Eq. 14, from sampled pairs (Sec. 3.4): joint pairs (Y_i, M_i) and (Y_i, M_j) for a
        pseudo-graph positive j; marginal pairs (Y_i, M_k) for pseudo-graph negatives k, picked by
        `scores` (`pair_scores`)."""
        positive, positive_valid, negatives, negatives_valid = triplet_pairs(
            graph, scores, self.hparams.num_negatives
        )
        # Every anchor's pairs are scored, the ones that do not exist (`*_valid`) with weight 0:
        # picking the existing ones by boolean masks would make the host wait for the device.
        anchor = torch.arange(len(deep), device=deep.device)
        joint = (torch.cat([anchor, anchor]), torch.cat([anchor, positive]))
        joint_weights = torch.cat([torch.ones_like(positive_valid), positive_valid]).float()
        marginal = (anchor[:, None].expand_as(negatives).flatten(), negatives.flatten())
        # index_select, not deep[...]: its backward (index_add_) is deterministic on the CPU, while
        # advanced indexing's (index_put_ with accumulate) adds repeated rows in a varying order,
        # and one flipped threshold of the pseudo-graph then makes two identical runs drift apart.
        deep_rows, shallow_rows = torch.cat([joint[0], marginal[0]]), torch.cat([joint[1], marginal[1]])
        scores = discriminator(deep.index_select(0, deep_rows), shallow.index_select(0, shallow_rows))
        return mutual_information_loss(
            scores[: len(joint[0])], scores[len(joint[0]) :], joint_weights, negatives_valid.flatten().float()
        )

    def pair_scores(self, index: Tensor, batch_idx: int) -> Tensor:
        """I.i.d. uniform scores of all pairs of the global batch, which pick the random positives
        and negatives. Drawn from (seed, epoch, batch) in the order of the samples' dataset
        indices, so that every rank draws the same pairs, however the batch is split over the
        ranks, and a resumed run draws them again."""
        generator = torch.Generator(device=index.device)
        generator.manual_seed(derive_seed(self.current_epoch, batch_idx, _PAIR_DRAW))
        scores = torch.rand(len(index), len(index), generator=generator, device=index.device)
        position = index.argsort().argsort()  # each sample's place in dataset-index order
        return scores[position][:, position]

    @torch.no_grad()
    def log_diagnostics(
        self, head: int, probs: Tensor, graph: Tensor, confident: Tensor, labels: Tensor
    ) -> None:
        """The paper's Figs. 5-6 of one head: share of confident predictions, pseudo-graph density
        and, where labels exist, the pseudo-graph's BCubed precision and recall. Logged, never
        used. Head 0's as train/<name>, the others' as train/<name>_head<h>."""
        n = len(graph)
        stats = {
            "confident": confident.float().mean(),
            "max_probability": probs.max(1).values.mean(),
            "graph_positives": (graph.sum() - n).float() / max(n * (n - 1), 1),
        }
        if self._all_labelled and n > 1:  # known on the host: no wait for the device
            stats["graph_precision"], stats["graph_recall"] = graph_bcubed(graph, labels)
        elif not self._all_labelled:  # some samples without a label (-1): picking the others waits
            known = labels >= 0
            if known.sum() > 1:
                stats["graph_precision"], stats["graph_recall"] = graph_bcubed(
                    graph[known][:, known], labels[known]
                )
        suffix = f"_head{head}" if head else ""
        self.log_dict(
            {f"train/{name}{suffix}": value.float() for name, value in stats.items()},
            on_step=False,
            on_epoch=True,
            batch_size=self._batch_size,
        )
