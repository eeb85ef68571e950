"""What every clustering method shares.

A method subclasses `ClusteringMethod`, builds its heads, writes `training_step` the way its
paper's algorithm reads, and returns `self.objective(terms)`. It also says how it assigns
clusters (`cluster_logits`). The base class does the rest, the same way for every method:

- evaluation: ACC / NMI / ARI per head (torchmetrics, synced over ranks), labels used only to
  report them; or, for a method without a trained cluster head, k-means on its features
  (`init_kmeans_clusters`), with the centres kept for online prediction;
- label-free head selection: the head with the lowest unsupervised training loss (SCAN's rule);
- online prediction: cluster and confidence of any batch, a single image included;
- optimizer and schedule from the config (`optimizer`, `lr_scheduler` callables);
- per-step reseeding, so that a resumed run repeats the same random draws (clusterlab.seeding);
- a NaN guard that names the loss term, epoch and step;
- checkpoints that say which method wrote them, and refuse to load into another.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn

from clusterlab import __version__
from clusterlab.distributed import all_reduce_sum, broadcast, gather
from clusterlab.errors import CheckpointError, DivergenceError
from clusterlab.metrics import ClusteringMetrics
from clusterlab.neighbors import kmeans
from clusterlab.seeding import reseed, run_seed

OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]
LRSchedulerCallable = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class CheckpointMismatchError(CheckpointError):
    """A checkpoint written by another method (or not by clusterlab) was given to this one."""


class ClusteringMethod(pl.LightningModule, ABC):
    """Base class of CC, NNM, SCL, DCCM and SimCLR.

    Args:
        num_clusters: C, the number of clusters (linked from the data module by the CLI).
        backbone: feature extractor with an `out_dim` attribute.
        num_heads: number of cluster heads the method trains.
        optimizer: builds the optimizer from the parameters (a class path with init_args in YAML).
        lr_scheduler: builds a learning-rate scheduler from the optimizer; None: constant rate.
    """

    def __init__(
        self,
        num_clusters: int,
        backbone: nn.Module,
        num_heads: int = 1,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.num_clusters, self.num_heads = num_clusters, num_heads
        self.backbone = backbone
        self.build_optimizer, self.build_lr_scheduler = optimizer, lr_scheduler
        self.eval_metrics = nn.ModuleList(ClusteringMetrics() for _ in range(num_heads))
        # Mean unsupervised loss of each head over the last training epoch: selects the head.
        self.register_buffer("head_loss", torch.full((num_heads,), float("nan")))
        # The running sums of the epoch in progress are buffers too, so that a run resumed from a
        # checkpoint inside an epoch selects the same head as an uninterrupted one.
        self.register_buffer("head_loss_sum", torch.zeros(num_heads))
        self.register_buffer("head_loss_steps", torch.zeros((), dtype=torch.long))
        self.epochs_trained = 0  # completed training epochs, kept in the checkpoint's "clusterlab" entry
        self._batch_size: int | None = None
        self.eval_results: dict = {}
        self.input_shape: list[int] | None = None  # C, H, W of the training images (for predict on a folder)
        # Label-based diagnostics of the features (neighbour label agreement, ...): reported in
        # metrics.json next to ACC / NMI / ARI, never used to choose anything.
        self.diagnostics: dict[str, float] = {}
        self.kmeans_clusters = False
        self._eval_features: list[tuple[Tensor, Tensor]] = []
        self._cluster_counts: Tensor | None = None

    def init_kmeans_clusters(self, feature_dim: int, enabled: bool = True) -> None:
        """Registers the `centroids` buffer (C x feature_dim). When enabled, clusters are k-means
        centres of `cluster_features`, refitted on the whole evaluation set at every evaluation
        (on rank 0, then broadcast) and kept in the checkpoint, so prediction stays online. The one
        way a method without a trained cluster head (SimCLR, CC's "ICH only") is evaluated."""
        self.kmeans_clusters = enabled
        self.register_buffer("centroids", torch.zeros(self.num_clusters, feature_dim))

    def save_hyperparameters(self, *args, ignore=None, frame=None, logger: bool = True) -> None:
        """Keep the constructor's arguments in the checkpoint, so `test` and `predict` can rebuild the
        method from the checkpoint alone. Built by the CLI, these are the parsed config (plain data);
        built in Python, module- and callable-valued arguments are left out (the weights are in the
        state dict)."""
        frame = frame or inspect.currentframe().f_back
        if _given_hyperparameters.get() is None:
            unsaveable = [k for k, v in frame.f_locals.items() if isinstance(v, nn.Module) or callable(v)]
            ignore = list(ignore or []) + unsaveable
        super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)

    # -- what a method provides -------------------------------------------------------------

    @abstractmethod
    def cluster_logits(self, x: Tensor) -> Tensor:
        """Cluster logits of the (float, un-augmented) input: num_heads x B x C."""

    def cluster_features(self, x: Tensor) -> Tensor:
        """The features that k-means clusters (methods that call `init_kmeans_clusters`)."""
        raise NotImplementedError(f"{type(self).__name__} has no k-means features")

    def kmeans_logits(self, x: Tensor) -> Tensor:
        """The nearest k-means centre as logits (1 x B x C): minus the distance to each centre."""
        return -torch.cdist(self.cluster_features(x), self.centroids)[None]

    def on_eval_features(self, stage: str, features: Tensor, labels: Tensor) -> None:
        """Called with the gathered evaluation features and labels after k-means (all ranks)."""

    def plain(self, images: Tensor) -> Tensor:
        """The evaluation input: the method's views without augmentation."""
        return self.views.plain(images)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Features of uint8 images for embedding plots: the backbone's, unless a method knows better."""
        return self.backbone(self.plain(images))

    # -- training ---------------------------------------------------------------------------

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        reseed(self.current_epoch, batch_idx, self.global_rank)
        self._batch_size = len(batch["index"])

    def objective(self, terms: dict[str, Tensor], head_losses: Tensor | None = None) -> Tensor:
        """The total loss: the sum of the (already weighted) terms. Logs each term, stops the run on
        a non-finite one, and records each head's loss for label-free head selection."""
        loss = torch.stack(list(terms.values())).sum()
        if not torch.isfinite(loss):
            bad = {name: value.item() for name, value in terms.items() if not torch.isfinite(value)}
            raise DivergenceError(
                f"{type(self).__name__} diverged: non-finite loss at epoch {self.current_epoch}, step {self.global_step} "
                f"(lr {self._learning_rate()}): " + ", ".join(f"{name} = {value}" for name, value in bad.items())
                + ". Lower the learning rate, or check the input data."
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=self._batch_size)
        self.log_dict(
            {f"train/{name}": value.detach() for name, value in terms.items()},
            on_step=False,
            on_epoch=True,
            batch_size=self._batch_size,
        )
        per_head = head_losses if head_losses is not None else loss.expand(self.num_heads)
        self.head_loss_sum += per_head.detach().float()  # stays on the device: no sync per step
        self.head_loss_steps += 1
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # A step can leave the loss finite and the weights or running statistics not (a huge
        # learning rate): stop here, before anything downstream (evaluation, figures) uses them.
        named = [(n, t.detach()) for n, t in (*self.named_parameters(), *self.named_buffers())
                 if t.is_floating_point() and t.numel() and not n.startswith("head_loss")]  # fmt: skip
        if named and not torch.stack([t.abs().amax() for _, t in named]).isfinite().all():
            broken = [name for name, t in named if not t.isfinite().all()]
            raise DivergenceError(
                f"{type(self).__name__} diverged: parameters are no longer finite after epoch {self.current_epoch}, "
                f"step {self.global_step} (lr {self._learning_rate()}; {', '.join(broken[:3])}"
                + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
                + "). Lower the learning rate."
            )

    def _learning_rate(self) -> str:
        trainer = self._trainer
        if trainer is None or not trainer.optimizers:
            return "unknown"
        return ", ".join(f"{group['lr']:g}" for group in trainer.optimizers[0].param_groups[:2])

    def on_train_epoch_start(self) -> None:
        self.head_loss_sum.zero_()
        self.head_loss_steps.zero_()

    def on_train_epoch_end(self) -> None:
        steps = all_reduce_sum(self.head_loss_steps.float())
        total = all_reduce_sum(self.head_loss_sum)
        if steps > 0:
            self.head_loss.copy_(total / steps)
        self.epochs_trained += 1

    @property
    def selected_head(self) -> int:
        """The head with the lowest unsupervised loss (no labels involved); 0 before any training."""
        if torch.isnan(self.head_loss).all():
            return 0
        return int(torch.nan_to_num(self.head_loss, nan=math.inf).argmin())

    def configure_optimizers(self):
        # Frozen parameters (a momentum encoder's) are not the optimizer's: no weight decay on them.
        optimizer = self.build_optimizer([p for p in self.parameters() if p.requires_grad])
        if self.build_lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.build_lr_scheduler(optimizer)}

    # -- evaluation and prediction ----------------------------------------------------------

    @torch.no_grad()
    def predict_proba(self, images: Tensor) -> Tensor:
        """Soft assignments of a batch of uint8 images (a single image too): num_heads x B x C."""
        return self.cluster_logits(self.plain(images)).float().softmax(-1)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.kmeans_clusters:
            with torch.no_grad():
                self._eval_features.append((self.cluster_features(self.plain(batch["image"])), batch["label"]))
            return
        probs = self.predict_proba(batch["image"])
        for h, (metrics, head_probs) in enumerate(zip(self.eval_metrics, probs)):
            clusters = head_probs.argmax(-1)
            metrics.update(clusters, batch["label"])
            self._count_clusters(h, clusters)

    def _count_clusters(self, head: int, clusters: Tensor) -> None:
        """Cluster sizes of the evaluation set, per head: what the collapse check reads (no labels)."""
        if self._cluster_counts is None or self._cluster_counts.device != clusters.device:
            self._cluster_counts = torch.zeros(self.num_heads, self.num_clusters, dtype=torch.long, device=clusters.device)
        self._cluster_counts[head] += torch.bincount(clusters, minlength=self.num_clusters)[: self.num_clusters]

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def _fit_kmeans(self, stage: str) -> None:
        z = torch.cat([z for z, _ in self._eval_features])
        labels = torch.cat([y for _, y in self._eval_features])
        self._eval_features.clear()
        z_all, labels_all = gather(z), gather(labels)  # k-means over the whole evaluation set
        if self.global_rank == 0:
            # Fewer evaluation images than clusters (a smoke test's data): as many clusters as images.
            centroids = kmeans(z_all, min(self.num_clusters, len(z_all)), seed=run_seed())[1].to(self.centroids)
            self.centroids.copy_(centroids[torch.arange(self.num_clusters) % len(centroids)])
        self.centroids.copy_(broadcast(self.centroids))
        clusters = torch.cdist(z, self.centroids).argmin(1)
        self.eval_metrics[0].update(clusters, labels)
        self._count_clusters(0, clusters)
        self.on_eval_features(stage, z_all, labels_all)

    def _report(self, stage: str) -> None:
        if self.kmeans_clusters and self._eval_features:
            self._fit_kmeans(stage)
        labelled = all_reduce_sum(torch.tensor(self.eval_metrics[0].labelled, device=self.device))
        # No labels anywhere (a folder of photos): nothing to report, clusters are still predicted.
        heads = [{k: float(v) for k, v in m.compute().items()} if labelled else {} for m in self.eval_metrics]
        for metrics in self.eval_metrics:
            metrics.reset()
        selected = self.selected_head
        counts = self._cluster_counts
        counts = torch.zeros(self.num_heads, self.num_clusters, dtype=torch.long, device=self.device) if counts is None else counts
        sizes = all_reduce_sum(counts.to(self.device))[selected].tolist()
        self._cluster_counts = None
        self.eval_results = {"heads": heads, "selected_head": selected, **heads[selected], "cluster_sizes": sizes,
                             "collapsed": collapsed(sizes)}  # fmt: skip
        for name, value in heads[selected].items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "acc", sync_dist=False)
        if self.num_heads > 1:
            for h, results in enumerate(heads):
                self.log_dict({f"{stage}/head{h}/{name}": value for name, value in results.items()})

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Online prediction: cluster (argmax of the selected head) and its probability."""
        confidence, cluster = self.predict_proba(batch["image"])[self.selected_head].max(-1)
        return {"index": batch["index"], "cluster": cluster, "confidence": confidence}

    # -- checkpoints ------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        train_set = getattr(self.trainer.datamodule, "train_set", None) if self.trainer.datamodule else None
        if train_set is not None:
            self.input_shape = list(train_set.images.shape[1:])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["clusterlab"] = {
            "method": type(self).__name__,
            "num_clusters": self.num_clusters,
            "input_shape": self.input_shape,
            "epochs_trained": self.epochs_trained,
            "version": __version__,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        where = getattr(self._trainer, "ckpt_path", None) if self._trainer else None
        where = f" {where}" if where else ""
        meta = checkpoint.get("clusterlab")
        if meta is None:
            raise CheckpointMismatchError(f"checkpoint{where} was not written by clusterlab (no 'clusterlab' entry)")
        if meta["method"] != type(self).__name__:
            raise CheckpointMismatchError(
                f"checkpoint{where} holds a {meta['method']} model; this run configures {type(self).__name__}. "
                f"Use the config the checkpoint was trained with (its run directory has config.yaml)."
            )
        self.epochs_trained = meta.get("epochs_trained", checkpoint.get("epoch", -1) + 1)
        self.input_shape = meta.get("input_shape")
        if meta["num_clusters"] != self.num_clusters:
            raise CheckpointMismatchError(
                f"checkpoint{where} has {meta['num_clusters']} clusters; this run configures {self.num_clusters}"
            )


def collapsed(sizes: list[int], largest_share: float = 0.9) -> bool:
    """Whether clusters collapsed, from their sizes alone (no label): the largest holds more than
    `largest_share` of the images, or fewer than half of the clusters hold any."""
    total = sum(sizes)
    if total == 0:
        return False
    return max(sizes) > largest_share * total or sum(s > 0 for s in sizes) < len(sizes) / 2
