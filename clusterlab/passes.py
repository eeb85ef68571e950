"""The one way to pass over a data set without gradients.

Every whole-data-set pass of a run goes through here: the evaluation (Lightning's validation and
test loops feed `SampleOutputs`), the k-means fit of a k-means cluster head (on the evaluation's
gathered features), SCL's pseudo-label refresh, NNM's neighbour mining and global neighbours, and
the figures (`pass_over`). `predict` streams its rows out batch by batch instead (a folder may not
fit in memory) through the same per-batch function a method assigns clusters with
(`ClusteringMethod.assign`).

Under DDP each process passes over its shard (a `ShardSampler` loader: every sample exactly once),
then the outputs are gathered, so every process ends with every sample's outputs in dataset order
(the order of the `index` every batch carries) and can take the same decision from them. Outputs
that only rank 0 reads (`rank0_only`: the evaluation it reports, features it searches or clusters)
are gathered to rank 0 alone: at 1M images x 512 features that is 2 GiB no other rank holds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from clusterlab.distributed import gather, gather_to_rank0, rank

Step = Callable[[dict[str, Tensor]], dict[str, Tensor]]


class SampleOutputs:
    """Per-sample outputs, added a batch at a time on each process, then gathered: every process
    holds every sample's outputs (rank 0 alone those named `rank0_only`), rows in dataset order.
    Every process must call `gather`."""

    def __init__(self) -> None:
        self._parts: dict[str, list[Tensor]] = {}

    def add(self, index: Tensor, **outputs: Tensor) -> None:
        """Rows of one batch: `index` (B) and outputs with B rows each."""
        for key, value in {"index": index, **outputs}.items():
            self._parts.setdefault(key, []).append(value.detach())

    def __bool__(self) -> bool:
        return bool(self._parts)

    def gather(self, rank0_only: bool | Collection[str] = ()) -> dict[str, Tensor]:
        """The outputs in dataset order. `rank0_only` (True: all): outputs gathered to rank 0 alone
        and absent on the other ranks ("index" goes wherever another output goes)."""
        parts, self._parts = self._parts, {}
        if not parts:
            return {}
        only = set(parts) - {"index"} if rank0_only is True else set(rank0_only)
        everywhere = bool(set(parts) - only - {"index"})
        outputs = {}
        for key, values in sorted(parts.items()):  # the same keys in the same order on every rank
            to_all = key not in only if key != "index" else everywhere
            value = (gather if to_all else gather_to_rank0)(torch.cat(values))
            if value is not None:
                outputs[key] = value
        if "index" not in outputs:  # not rank 0, and everything was rank 0's
            return {}
        order = outputs["index"].argsort()
        return {key: value[order] for key, value in outputs.items()}


@torch.no_grad()
def pass_over(
    module: nn.Module,
    loader: Iterable[dict[str, Tensor]],
    step: Step,
    device: torch.device | str | None = None,
    precision=None,
    description: str | None = None,
    rank0_only: bool | Collection[str] = (),
) -> dict[str, Tensor]:
    """`step(batch)` on every batch of `loader`, in eval mode and without gradients, with the
    batch on `device` (default: the module's) and in the run's precision (`precision`: the
    trainer's precision plugin, for AMP); returns the gathered per-sample outputs (`SampleOutputs`;
    `rank0_only` of them on rank 0 only). `description` shows a progress bar on rank 0 when the
    output is a terminal."""
    device = device or next(module.parameters()).device
    was_training = module.training
    module.eval()
    outputs = SampleOutputs()
    try:
        for batch in _progress(loader, description):
            batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
            # A fresh context per batch: an AMP plugin's forward_context can be entered only once.
            with precision.forward_context() if precision is not None else nullcontext():
                outputs.add(batch["index"], **step(batch))
    finally:
        module.train(was_training)
    return outputs.gather(rank0_only)


def _progress(loader: Iterable, description: str | None) -> Iterable:
    if description is None or rank() != 0 or not sys.stdout.isatty():
        return loader
    from rich.progress import track

    return track(loader, description=description, transient=True)
