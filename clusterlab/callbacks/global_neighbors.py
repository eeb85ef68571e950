"""NNM's global nearest neighbours (nnm-paper Sec. 3.2.2, Algorithm 1 lines 16-17).

At the end of every training epoch: the backbone features g (N x D) and the predictions h
(heads x N x C) of the whole training set, each sample's nearest neighbour in g, and that
neighbour's predictions, stored per sample **in dataset order**: row i of `table` is the
prediction of i's own nearest neighbour, looked up by the sample index every batch carries.
(The authors' code stores the rows in the shuffled loader order and indexes them by dataset index,
which pairs samples with the wrong rows.)

Under DDP every rank extracts its share of the training set, the shares are gathered and put
back in dataset order, rank 0 searches the neighbours and broadcasts them, so the table is the
same on every rank. It is this callback's state, so it lives in the checkpoint and a resumed run
continues with the table it stopped with.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from clusterlab.distributed import broadcast, gather
from clusterlab.neighbors import knn
from clusterlab.seeding import derive_seed

_GLOBAL_NEIGHBOR_STREAM = 2


class GlobalNeighbors(pl.Callback):
    """Keeps N_global(h): per head, the prediction of each training sample's global neighbour.

    Args:
        num_neighbors: neighbours searched per sample; with more than one, one of them is drawn at
            random per sample and epoch (nnm-paper Table 5; 1 in the paper's setting).
        batch_size: images per forward pass while extracting.
    """

    def __init__(self, num_neighbors: int = 1, batch_size: int = 512) -> None:
        self.num_neighbors, self.batch_size = num_neighbors, batch_size
        self.table: Tensor | None = None  # heads x N x C, dataset order; None before the first epoch end
        self.neighbor_index: Tensor | None = None  # N: the global neighbour of each sample
        self.epoch = -1  # the epoch at whose end the table was computed

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # The epoch's last batch, before validation and the epoch-end checkpoint (which must hold
        # the new table for a resumed run to continue identically).
        if batch_idx + 1 >= trainer.num_training_batches:
            self.refresh(trainer, pl_module)

    @torch.no_grad()
    def refresh(self, trainer: pl.Trainer, pl_module) -> None:
        data = trainer.datamodule
        if data is None or getattr(data, "train_set", None) is None:
            raise RuntimeError("GlobalNeighbors needs the training split of a ClusterDataModule (trainer.fit(model, datamodule))")
        images = data.train_set.images
        device = pl_module.device
        share = torch.arange(trainer.global_rank, len(images), trainer.world_size)
        was_training = pl_module.training
        pl_module.eval()
        features, predictions = [], []
        for rows in share.split(self.batch_size):
            f, logits = pl_module.features_and_logits(pl_module.plain(images[rows].to(device)))
            features.append(F.normalize(f.float(), dim=1))
            predictions.append(logits.float().softmax(-1).transpose(0, 1))  # rows first, for gather
        pl_module.train(was_training)
        index = gather(share.to(device))
        order = index.argsort()  # back to dataset order
        g = gather(torch.cat(features))[order]  # N x D
        h = gather(torch.cat(predictions))[order].transpose(0, 1)  # heads x N x C

        neighbor = torch.zeros(len(images), dtype=torch.long, device=device)
        if trainer.global_rank == 0:
            candidates, _ = knn(g, self.num_neighbors)
            generator = torch.Generator().manual_seed(derive_seed(trainer.current_epoch, _GLOBAL_NEIGHBOR_STREAM))
            column = torch.randint(self.num_neighbors, (len(candidates),), generator=generator)
            neighbor = candidates[torch.arange(len(candidates)), column].to(device)
        neighbor = broadcast(neighbor)
        self.neighbor_index = neighbor.cpu()
        self.table = h[:, neighbor].cpu()
        self.epoch = trainer.current_epoch

    def predictions(self, index: Tensor) -> Tensor | None:
        """N_global(h)_b: the stored rows of the batch's samples (heads x B x C), or None before the first epoch end."""
        return None if self.table is None else self.table[:, index.cpu()]

    def state_dict(self) -> dict:
        return {"table": self.table, "neighbor_index": self.neighbor_index, "epoch": self.epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.table, self.neighbor_index = state_dict["table"], state_dict["neighbor_index"]
        self.epoch = state_dict["epoch"]
