"""What every clustering method shares.

A method subclasses `ClusteringMethod`, builds its heads, writes `training_step` the way its
paper's algorithm reads, and returns `self.objective(terms)`. It also says how it assigns
clusters (`cluster_logits`). The base class does the rest, the same way for every method:

- evaluation: ACC / NMI / ARI per head (torchmetrics, synced over ranks), labels used only to
  report them;
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
from clusterlab.distributed import all_reduce_sum
from clusterlab.metrics import ClusteringMetrics
from clusterlab.seeding import reseed

OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]
LRSchedulerCallable = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class CheckpointMismatchError(ValueError):
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
        self._head_loss_sum = torch.zeros(num_heads, dtype=torch.float64)
        self._head_loss_steps = 0
        self._batch_size: int | None = None
        self.eval_results: dict = {}

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

    def plain(self, images: Tensor) -> Tensor:
        """The evaluation input: the method's views without augmentation."""
        return self.views.plain(images)

    # -- training ---------------------------------------------------------------------------

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        reseed(self.current_epoch, batch_idx, self.global_rank)
        self._batch_size = len(batch["index"])

    def objective(self, terms: dict[str, Tensor], head_losses: Tensor | None = None) -> Tensor:
        """The total loss: the sum of the (already weighted) terms. Logs each term, stops on a
        non-finite one, and records each head's loss for label-free head selection."""
        loss = torch.stack(list(terms.values())).sum()
        if not torch.isfinite(loss):
            bad = {name: value.item() for name, value in terms.items() if not torch.isfinite(value)}
            raise FloatingPointError(
                f"{type(self).__name__}: non-finite loss at epoch {self.current_epoch}, step {self.global_step}: "
                + ", ".join(f"{name} = {value}" for name, value in bad.items())
                + ". Lower the learning rate, or check the input data."
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=self._batch_size)
        self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()},
                      on_step=False, on_epoch=True, batch_size=self._batch_size)  # fmt: skip
        per_head = head_losses if head_losses is not None else loss.expand(self.num_heads)
        self._head_loss_sum += per_head.detach().double().cpu()
        self._head_loss_steps += 1
        return loss

    def on_train_epoch_start(self) -> None:
        self._head_loss_sum.zero_()
        self._head_loss_steps = 0

    def on_train_epoch_end(self) -> None:
        steps = all_reduce_sum(torch.tensor(float(self._head_loss_steps), device=self.device))
        total = all_reduce_sum(self._head_loss_sum.to(self.device))
        if steps > 0:
            self.head_loss.copy_(total / steps)

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
        probs = self.predict_proba(batch["image"])
        for metrics, head_probs in zip(self.eval_metrics, probs):
            metrics.update(head_probs.argmax(-1), batch["label"])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def _report(self, stage: str) -> None:
        labelled = all_reduce_sum(torch.tensor(self.eval_metrics[0].labelled, device=self.device))
        # No labels anywhere (a folder of photos): nothing to report, clusters are still predicted.
        heads = [{k: float(v) for k, v in m.compute().items()} if labelled else {} for m in self.eval_metrics]
        for metrics in self.eval_metrics:
            metrics.reset()
        selected = self.selected_head
        self.eval_results = {"heads": heads, "selected_head": selected, **heads[selected]}
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["clusterlab"] = {
            "method": type(self).__name__,
            "num_clusters": self.num_clusters,
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
        if meta["num_clusters"] != self.num_clusters:
            raise CheckpointMismatchError(
                f"checkpoint{where} has {meta['num_clusters']} clusters; this run configures {self.num_clusters}"
            )
