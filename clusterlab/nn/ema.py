"""The one exponential moving average of a network: theta~ <- m theta~ + (1 - m) theta."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update_(average: nn.Module, online: nn.Module, momentum: float, copy_buffers: bool = False) -> None:
    """Move `average`'s parameters towards `online`'s (same structure, same parameter names):
    p~ <- m p~ + (1 - m) p. copy_buffers: also take `online`'s buffers (BatchNorm statistics) as
    they are (MoCo's key encoder); otherwise `average` keeps its own."""
    online_parameters = dict(online.named_parameters())
    names = [name for name, _ in average.named_parameters()]
    if names != list(online_parameters):
        raise RuntimeError(
            f"the moving average does not mirror its network: {names} vs {list(online_parameters)}"
        )
    torch._foreach_lerp_(
        list(average.parameters()), [online_parameters[n].detach() for n in names], 1.0 - momentum
    )
    if copy_buffers:
        for target, source in zip(average.buffers(), online.buffers()):
            target.copy_(source)
