"""Loss pieces shared by several papers: NT-Xent and the entropy of a cluster marginal.

Losses are pure functions of already-gathered tensors (see clusterlab.distributed.gather), and
run in float32 even under AMP: softmax, log and entropy terms lose too much in half precision.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def float32(loss_fn):
    """Run `loss_fn` outside autocast with its floating-point tensor arguments cast to float32."""

    def cast(value):
        return value.float() if isinstance(value, Tensor) and value.is_floating_point() else value

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return loss_fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    return wrapper


@float32
def nt_xent(u: Tensor, v: Tensor, temperature: float) -> Tensor:
    """Normalised-temperature cross-entropy over the 2M rows of [u; v] (SimCLR).

    Row i of u and row i of v are the positive pair; the other 2M - 2 rows are negatives, the
    row itself is left out. Similarity is cosine similarity divided by `temperature`; the loss
    is the mean over all 2M rows.
    """
    m = u.shape[0]
    rows = F.normalize(torch.cat([u, v]), dim=1)
    logits = rows @ rows.T / temperature
    logits.fill_diagonal_(float("-inf"))
    positive = torch.cat([torch.arange(m, 2 * m), torch.arange(0, m)]).to(u.device)
    return F.cross_entropy(logits, positive)


@float32
def entropy(p: Tensor, eps: float = 1e-8) -> Tensor:
    """H(p) = -sum_j p_j log p_j of a distribution p (last dimension)."""
    return -(p * torch.log(p.clamp_min(eps))).sum(-1)
