"""Make batch-level quantities global under DDP; every helper is the identity on one process.

The methods' losses are functions of the *global* batch: contrastive similarities, cluster
marginals and memory updates all span every rank. `gather` is the one way to get there. It keeps
gradients, so a run on N processes computes the same loss and, after DDP's gradient averaging,
the same gradients as one process with the concatenated batch (tests/test_distributed.py).
What only rank 0 reads (the evaluation it reports, the features it searches) goes there alone,
through `gather_to_rank0`.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from clusterlab.errors import CheckpointError

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


# How long a rank waits in a collective before the run fails (the CLI gives it to Lightning's DDP
# strategy, whose default is 30 minutes). Rank 0 alone runs the k-means of a k-means head and the
# neighbour searches while the other ranks wait in a broadcast. At 1M x 512 on a CPU, k-means on
# its subsample takes minutes, well inside 2 hours; searching all 1M rows' neighbours on a CPU
# takes hours, longer than a timeout should wait for a hung rank: a GPU run searches on its GPU; a
# CPU-only run that large sets CLUSTERLAB_PROCESS_GROUP_TIMEOUT_MINUTES (figures: docs/results.md,
# "At 1M vectors" and "Measurements behind design choices").
PROCESS_GROUP_TIMEOUT = timedelta(minutes=120)


def process_group_timeout() -> timedelta:
    minutes = os.environ.get("CLUSTERLAB_PROCESS_GROUP_TIMEOUT_MINUTES")
    return timedelta(minutes=float(minutes)) if minutes else PROCESS_GROUP_TIMEOUT


def _padded_rows(x: Tensor) -> tuple[Tensor, list[int]]:
    """`x` padded with zero rows to the most rows any rank holds, and every rank's row count."""
    size = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(all_sizes, size)
    sizes = [int(s) for s in all_sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    return padded, sizes


def _gather_rows(x: Tensor) -> tuple[Tensor, list[int]]:
    """all_gather along dim 0 when ranks hold different numbers of rows: pad, gather, trim."""
    padded, sizes = _padded_rows(x)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sizes


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        gathered, ctx.sizes = _gather_rows(x)
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank computes the same global loss from the gathered rows, so this rank's rows
        # receive the gradient of every rank's copy: sum them. DDP then divides by the world size,
        # which leaves exactly the single-process gradient.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: dist.get_rank()])
        return grad[start : start + ctx.sizes[dist.get_rank()]]


def gather(x: Tensor) -> Tensor:
    """Concatenate `x` over all ranks along dim 0 in rank order, keeping gradients.

    Ranks may hold different numbers of rows (masked batches, uneven evaluation shards).
    """
    if not is_distributed():
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _Gather.apply(x)
    return _gather_rows(x.detach())[0]


def gather_to_rank0(x: Tensor) -> Tensor | None:
    """On rank 0, `x` of every rank concatenated along dim 0 in rank order; None on the others
    (no gradient). Ranks may hold different numbers of rows (padded and trimmed as `gather`)."""
    if not is_distributed():
        return x
    padded, sizes = _padded_rows(x.detach())
    parts = [torch.empty_like(padded) for _ in sizes] if dist.get_rank() == 0 else None
    dist.gather(padded, parts, dst=0)
    return None if parts is None else torch.cat([p[:n] for p, n in zip(parts, sizes)])


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of `x` over ranks (no gradient), for counters and per-head loss statistics."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def broadcast(x: Tensor, src: int = 0) -> Tensor:
    """Rank `src`'s value of `x` on every rank (no gradient)."""
    if not is_distributed():
        return x
    x = x.detach().clone().contiguous()
    dist.broadcast(x, src)
    return x


def read_on_rank0(path: Path | None, read: Callable[[Path], T], what: str, device) -> tuple[T | None, bool]:
    """A cache file read by rank 0 alone, when it exists: (what `read` returned there, None on the
    other ranks; whether it was found, on every rank). Rank 0 says what it found (none, read,
    unreadable), so every process takes the same branch; a file `read` refuses (CheckpointError)
    stops every process together, with rank 0's message, not in a hang. `what` names the file."""
    value, found, problem = None, 0, None
    if rank() == 0 and path is not None and path.exists():
        try:
            value, found = read(path), 1
        except CheckpointError as error:
            found, problem = 2, error
    found = int(broadcast(torch.tensor(found, device=device)))
    if found == 2:
        raise problem or CheckpointError(f"{what} {path} cannot be read (rank 0 says why)")
    return value, found == 1


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` (anything picklable: a report, a figure) on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


@atexit.register
def _destroy_process_group() -> None:
    """At exit, while the interpreter is still whole: left to interpreter teardown, gloo's worker
    threads now and then abort the process (SIGABRT, "terminate called without an active
    exception") after all its work is done, and the launcher reports a failed run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def lengthen_default_timeout(strategy) -> None:
    """A DDP strategy left at Lightning's 30-minute default process-group timeout waits
    `process_group_timeout()` instead (rank 0's k-means and neighbour searches, while the other
    ranks wait in a broadcast); a timeout the config set is kept. Called before the process group
    is made (trainer.fit)."""
    from lightning_fabric.plugins.collectives.torch_collective import default_pg_timeout

    # Lightning keeps the timeout in the strategy's private `_timeout` and offers no setter for it.
    if getattr(strategy, "_timeout", None) == default_pg_timeout:
        strategy._timeout = process_group_timeout()
