"""Make batch-level quantities global under DDP; every helper is the identity on one process.

The methods' losses are functions of the *global* batch: contrastive similarities, cluster
marginals and memory updates all span every rank. `gather` is the one way to get there. It keeps
gradients, so a run on N processes computes the same loss and, after DDP's gradient averaging,
the same gradients as one process with the concatenated batch (tests/test_distributed.py).
"""

from __future__ import annotations

import atexit

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def _gather_rows(x: Tensor) -> tuple[Tensor, list[int]]:
    """all_gather along dim 0 when ranks hold different numbers of rows: pad, gather, trim."""
    size = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(all_sizes, size)
    sizes = [int(s) for s in all_sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
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


@atexit.register
def _destroy_process_group() -> None:
    """At exit, while the interpreter is still whole: left to interpreter teardown, gloo's worker
    threads now and then abort the process (SIGABRT, "terminate called without an active
    exception") after all its work is done, and the launcher reports a failed run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
