"""What every clustering method shares.

A method subclasses `ClusteringMethod`, builds its heads, writes `training_step` the way its
paper's algorithm reads, and returns `self.objective(terms)`. It also says how it assigns
clusters (`cluster_logits`). The base class does the rest, the same way for every method:

- evaluation: ACC / NMI / ARI per head, from the gathered per-sample outputs of the evaluation
  set (`clusterlab.passes.SampleOutputs`), labels used only to report them; cluster sizes and a
  collapse check (no label involved);
- label-free head selection: the head with the lowest unsupervised training loss (SCAN's rule);
- online prediction: cluster and confidence of any batch, a single image included (`assign`);
- optimizer and schedule from the config (`optimizer`, `lr_scheduler` callables);
- per-step reseeding, so that a resumed run repeats the same random draws (clusterlab.seeding);
- a divergence guard that names the loss term, step and learning rate, or the parameter;
- checkpoints that say which method wrote them, and refuse to load into another.

A method without a trained cluster head composes a `clusterlab.nn.KMeansHead` and fits it in
`evaluation_clusters` (SimCLR; CC's "ICH only"; SCL without its target task).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from clusterlab import __version__
from clusterlab.distributed import all_reduce_sum
from clusterlab.errors import CheckpointError, DivergenceError
from clusterlab.metrics import evaluate
from clusterlab.passes import SampleOutputs
from clusterlab.seeding import reseed

OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]
LRSchedulerCallable = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class CheckpointMismatchError(CheckpointError):
    """A checkpoint written by another method (or not by clusterlab) was given to this one."""


class ClusteringMethod(pl.LightningModule, ABC):
    """Base class of CC, NNM, SCL, DCCM and SimCLR.

    A subclass calls `self.save_hyperparameters()` in its `__init__` (built by the CLI, that saves
    the parsed config; the checkpoint then rebuilds the method) and reads them as
    `self.hparams.<name>`. Loss-term switches are named `use_<term>`.

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
        # Mean unsupervised loss of each head over the last training epoch: selects the head. The
        # running sums of the epoch in progress are buffers too, so that a run resumed from a
        # checkpoint inside an epoch selects the same head as an uninterrupted one.
        self.register_buffer("head_loss", torch.full((num_heads,), float("nan")))
        self.register_buffer("head_loss_sum", torch.zeros(num_heads))
        self.register_buffer("head_loss_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("epochs_trained", torch.zeros((), dtype=torch.long))
        self._batch_size: int | None = None
        self._evaluation = SampleOutputs()
        self.eval_results: dict = {}
        self.input_shape: list[int] | None = None  # C, H, W of the training images (for predict on a folder)
        # Label-based diagnostics of the features (neighbour label agreement, ...): reported in
        # metrics.json next to ACC / NMI / ARI, never used to choose anything.
        self.diagnostics: dict[str, float] = {}

    # -- what a method provides -------------------------------------------------------------

    @abstractmethod
    def cluster_logits(self, x: Tensor) -> Tensor:
        """Cluster logits of the (float, un-augmented) input: num_heads x B x C."""

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
                f"{type(self).__name__} diverged: non-finite loss at epoch {self.current_epoch}, step "
                f"{self.global_step} "
                f"(lr {self._learning_rate()}): "
                + ", ".join(f"{name} = {value}" for name, value in bad.items())
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
        named = [
            (n, t.detach())
            for n, t in (*self.named_parameters(), *self.named_buffers())
            if t.is_floating_point() and t.numel() and not n.startswith("head_loss")
        ]
        if named and not torch.stack([t.abs().amax() for _, t in named]).isfinite().all():
            broken = [name for name, t in named if not t.isfinite().all()]
            raise DivergenceError(
                f"{type(self).__name__} diverged: parameters are no longer finite after epoch "
                f"{self.current_epoch}, "
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
        self.epochs_trained += 1  # before the epoch's checkpoint (Lightning saves after this hook)

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

    @torch.no_grad()
    def assign(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Online prediction of uint8 images: the selected head's cluster and its probability (B, B)."""
        confidence, cluster = self.predict_proba(images)[self.selected_head].max(-1)
        return cluster, confidence

    def evaluation_outputs(self, images: Tensor) -> dict[str, Tensor]:
        """What the evaluation keeps of each sample, rows first: every head's cluster (B x heads)."""
        return {"cluster": self.predict_proba(images).argmax(-1).T}

    def evaluation_clusters(self, outputs: dict[str, Tensor], stage: str) -> Tensor:
        """Every head's cluster of every evaluation sample (N x heads), from the gathered outputs
        (on every process). A method with a k-means head fits it here, on the whole set."""
        return outputs["cluster"]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        with torch.no_grad():
            self._evaluation.add(
                batch["index"], label=batch["label"], **self.evaluation_outputs(batch["image"])
            )

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def _report(self, stage: str) -> None:
        """ACC / NMI / ARI of every head (labels only report), the selected head's cluster sizes
        and whether the clusters collapsed. Every process gathers the outputs and computes the
        same figures from them, so no process waits for another afterwards."""
        outputs = self._evaluation.gather()
        if not outputs:
            return
        clusters = self.evaluation_clusters(outputs, stage).cpu()
        labels = outputs["label"].cpu()
        heads = [evaluate(clusters[:, h], labels) for h in range(clusters.shape[1])]
        selected = self.selected_head
        sizes = torch.bincount(clusters[:, selected], minlength=self.num_clusters)[
            : self.num_clusters
        ].tolist()
        self.eval_results = {
            "heads": heads,
            "selected_head": selected,
            **heads[selected],
            "cluster_sizes": sizes,
            "collapsed": collapsed(sizes),
        }
        for name, value in heads[selected].items():
            self.log(
                f"{stage}/{name}", value, prog_bar=name == "acc", sync_dist=True
            )  # the same on every rank
        if len(heads) > 1:
            for h, results in enumerate(heads):
                self.log_dict(
                    {f"{stage}/head{h}/{name}": value for name, value in results.items()}, sync_dist=True
                )

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Online prediction: cluster (argmax of the selected head) and its probability."""
        cluster, confidence = self.assign(batch["image"])
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
            "epochs_trained": int(self.epochs_trained),
            "version": __version__,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        where = getattr(self._trainer, "ckpt_path", None) if self._trainer else None
        where = f" {where}" if where else ""
        meta = checkpoint.get("clusterlab")
        if meta is None:
            raise CheckpointMismatchError(
                f"checkpoint{where} was not written by clusterlab (no 'clusterlab' entry)"
            )
        if meta["method"] != type(self).__name__:
            raise CheckpointMismatchError(
                f"checkpoint{where} holds a {meta['method']} model; this run configures "
                f"{type(self).__name__}. "
                f"Use the config the checkpoint was trained with (its run directory has config.yaml)."
            )
        self.input_shape = meta.get("input_shape")
        if meta["num_clusters"] != self.num_clusters:
            raise CheckpointMismatchError(
                f"checkpoint{where} has {meta['num_clusters']} clusters; this run configures "
                f"{self.num_clusters}"
            )


def collapsed(sizes: list[int], largest_share: float = 0.9) -> bool:
    """Whether clusters collapsed, from their sizes alone (no label): the largest holds more than
    `largest_share` of the images, or fewer than half of the clusters hold any."""
    total = sum(sizes)
    if total == 0:
        return False
    return max(sizes) > largest_share * total or sum(s > 0 for s in sizes) < len(sizes) / 2
