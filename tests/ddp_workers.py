"""Code that runs inside the processes of tests/test_distributed.py (forked; importable by name, so
that a spawned start would work too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from clusterlab.distributed import broadcast_object, gather, gather_to_rank0
from clusterlab.losses.cc import cluster_entropy, cluster_loss, instance_loss


def cc_loss(z_a, z_b, y_a, y_b):
    """CC's Eq. 7 on the global batch, from this process's rows."""
    z_a, z_b, y_a, y_b = gather(z_a), gather(z_b), gather(y_a), gather(y_b)
    return instance_loss(z_a, z_b, 0.5) + cluster_loss(y_a, y_b, 1.0) - cluster_entropy(y_a, y_b)


def loss_worker(rank: int, world: int, store: str, inputs: list[torch.Tensor], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = len(inputs[0]) // world
    local = [x[rank * rows : (rank + 1) * rows].clone().requires_grad_(True) for x in inputs]
    loss = cc_loss(*local)
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [x.grad for x in local]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def rank0_gather_worker(rank: int, world: int, store: str, out: str) -> None:
    """Uneven shards (rank 0: samples 0, 2, 4; rank 1: 1, 3) gathered to rank 0 alone and to all."""
    from clusterlab.passes import SampleOutputs

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    index = torch.arange(rank, 5, world)
    features = index[:, None].float().expand(-1, 3) * 10
    outputs = SampleOutputs()
    outputs.add(index, features=features, cluster=index % 2)
    split = outputs.gather(rank0_only=("features",))
    outputs.add(index, features=features)
    whole = outputs.gather(rank0_only=True)
    result = {
        "rows": gather_to_rank0(features),
        "none_from_one": gather_to_rank0(features if rank == 0 else features[:0]),
        "split": split,
        "whole": whole,
        "report": broadcast_object({"acc": 0.5} if rank == 0 else None),
    }
    torch.save(result, f"{out}/gather_rank{rank}.pt")
    dist.destroy_process_group()


class RecordFirstStep(pl.Callback):
    """Saves the loss, the (DDP-averaged) parameter gradients and the vote's co-assignment counts of
    the first training step."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {
            n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            torch.save(
                {
                    "loss": outputs["loss"].detach(),
                    "grads": self.grads,
                    "batch": batch["index"],
                    # what a step counts for the heads' vote (combine_heads "vote"), where it does
                    "head_agreement": getattr(pl_module, "head_agreement", torch.zeros(0)).clone(),
                },
                Path(self.out) / f"rank{trainer.global_rank}.pt",
            )


class RecordEvaluation(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_validation_end(self, trainer, pl_module) -> None:
        Path(self.out, f"eval_rank{trainer.global_rank}.json").write_text(json.dumps(pl_module.eval_results))


class RecordKMeansEvaluation(pl.Callback):
    """Saves what each rank holds after a k-means head's evaluation: report, diagnostics, centres."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_validation_end(self, trainer, pl_module) -> None:
        torch.save(
            {
                "eval": pl_module.eval_results,
                "diagnostics": dict(pl_module.diagnostics),
                "centroids": pl_module.cluster_head.centroids.clone(),
            },
            Path(self.out) / f"kmeans_rank{trainer.global_rank}.pt",
        )


class RecordGlobalTable(pl.Callback):
    """Saves NNM's global neighbour table as each rank holds it at the end of training."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(
            {
                "table": pl_module.global_neighbors.table,
                "neighbor_index": pl_module.global_neighbors.neighbor_index,
            },
            Path(self.out) / f"table_rank{trainer.global_rank}.pt",
        )
