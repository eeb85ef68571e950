"""NNM's global nearest neighbours (nnm-paper Sec. 3.2.2, Algorithm 1 lines 16-17).

At the end of every training epoch: the backbone features g (N x D) and the predictions h
(heads x N x C) of the whole training set, each sample's nearest neighbour in g, and that
neighbour's predictions, stored per sample **in dataset order**: row i of `table` is the
prediction of i's own nearest neighbour, looked up by the sample index every batch carries.
(The authors' code stores the rows in the shuffled loader order and indexes them by dataset index,
which pairs samples with the wrong rows.)

Under DDP every rank extracts its share of the training set (`clusterlab.passes.pass_over`), the
shares are gathered in dataset order (the features g to rank 0 only, the predictions h to every
rank), rank 0 searches the neighbours and broadcasts them, so the table is the same on every rank.
It is this callback's state, so it lives in the checkpoint and a resumed run continues with the
table it stopped with.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from clusterlab.contracts import require
from clusterlab.distributed import broadcast
from clusterlab.neighbors import knn
from clusterlab.seeding import derive_seed

_GLOBAL_NEIGHBOR_STREAM = 2


@runtime_checkable
class HasFeaturesAndLogits(Protocol):
    """A method whose heads' predictions come from backbone features it can return with them."""

    def plain(self, images: Tensor) -> Tensor:
        """The un-augmented network input of a batch of uint8 images."""
        ...

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Backbone features (B x D) and every head's logits (heads x B x C) of the input."""
        ...


class GlobalNeighbors(pl.Callback):
    """Keeps N_global(h): per head, the prediction of each training sample's global neighbour.

    Args:
        num_neighbors: neighbours searched per sample; with more than one, one of them is drawn at
            random per sample and epoch (nnm-paper Table 5; 1 in the paper's setting).
    """

    def __init__(self, num_neighbors: int = 1) -> None:
        self.num_neighbors = num_neighbors
        self.table: Tensor | None = None  # heads x N x C, dataset order; None before the first epoch end
        self.neighbor_index: Tensor | None = None  # N: the global neighbour of each sample
        self.epoch = -1  # the epoch at whose end the table was computed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        require(pl_module, HasFeaturesAndLogits, self)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # The epoch's last batch, before validation and the epoch-end checkpoint (which must hold
        # the new table for a resumed run to continue identically).
        if batch_idx + 1 >= trainer.num_training_batches:
            self.refresh(trainer, pl_module)

    def refresh(self, trainer: pl.Trainer, pl_module) -> None:
        data = trainer.datamodule
        if data is None or getattr(data, "train_set", None) is None:
            raise RuntimeError(
                "GlobalNeighbors needs the training split of a ClusterDataModule (trainer.fit(model, "
                "datamodule))"
            )

        def step(batch: dict[str, Tensor]) -> dict[str, Tensor]:
            f, logits = pl_module.features_and_logits(pl_module.plain(batch["image"]))
            return {"g": F.normalize(f.float(), dim=1), "h": logits.float().softmax(-1).transpose(0, 1)}

        out = pl_module.pass_over_training_set(step, rank0_only=("g",))  # only rank 0 searches
        h = out["h"].transpose(0, 1)  # heads x N x C, dataset order
        neighbor = torch.zeros(h.shape[1], dtype=torch.long, device=h.device)
        if trainer.global_rank == 0:
            candidates, _ = knn(out["g"], self.num_neighbors)  # g: N x D, dataset order
            generator = torch.Generator().manual_seed(
                derive_seed(trainer.current_epoch, _GLOBAL_NEIGHBOR_STREAM)
            )
            column = torch.randint(self.num_neighbors, (len(candidates),), generator=generator)
            neighbor = candidates[torch.arange(len(candidates)), column].to(h.device)
        neighbor = broadcast(neighbor)
        self.neighbor_index = neighbor.cpu()
        # The table stays on the training device: every step looks rows up in it, and a table on
        # the host would cost two blocking copies a step (the indices there, the rows back).
        self.table = h[:, neighbor].to(pl_module.device)
        self.epoch = trainer.current_epoch

    def predictions(self, index: Tensor) -> Tensor | None:
        """N_global(h)_b: the stored rows of the batch's samples (heads x B x C), on the device of
        `index`; None before the first epoch end."""
        if self.table is None:
            return None
        if self.table.device != index.device:  # once, after a checkpoint was loaded to the host
            self.table = self.table.to(index.device)
        return self.table[:, index]

    def state_dict(self) -> dict:
        table = None if self.table is None else self.table.cpu()
        return {"table": table, "neighbor_index": self.neighbor_index, "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.table, self.neighbor_index = state_dict["table"], state_dict["neighbor_index"]
        self.epoch = state_dict["epoch"]
