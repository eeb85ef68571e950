"""Nearest Neighbor Matching losses ("Nearest Neighbor Matching for Deep Clustering", Dang et al.,
CVPR 2021, CVF open access; no arXiv version).

Every function takes soft assignments (rows are samples, columns clusters) of the already
gathered global batch and is the same formula at the local level (Eqs. 7-8: anchors against their
pretext and batch neighbours) and the global level (Eqs. 9-10: against the global neighbours'
predictions of the previous epoch). MoCo's loss (Eq. 2) is here for the pretext.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterlab.losses.common import entropy, float32


@float32
def consistency_loss(a: Tensor, p: Tensor, eps: float = 1e-8) -> Tensor:
    """Eqs. 3, 7, 9: -log <a_i, p_i>, the dot product of each sample's assignment with its
    neighbour's, averaged over rows. (The authors' code writes BCE(<a_i, p_i>, 1): the same.)"""
    return -torch.log((a * p).sum(1).clamp_min(eps)).mean()


@float32
def class_contrastive_loss(a: Tensor, p: Tensor, temperature: float = 1.0) -> Tensor:
    """Eqs. 4, 8, 10: contrast the C columns (q = a^T, each a cluster's distribution over the
    batch): column i of `a` against column i of `p` (positive) and the other columns of `p`, by
    cosine similarity over the batch / temperature (tau = 1 in the paper); mean over the C columns."""
    q, n = F.normalize(a, dim=0), F.normalize(p, dim=0)
    logits = q.T @ n / temperature
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


@float32
def entropy_loss(p: Tensor) -> Tensor:
    """Eq. 5 as a loss: minus the entropy of the mean assignment M(p); minimal when the batch is
    spread evenly over the clusters (guards against the trivial one-cluster solution)."""
    return -entropy(p.mean(0))


@float32
def moco_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """Eq. 2 (MoCo): each query q_i against its key k_i and the M keys of the queue, cosine
    similarity / temperature. As in MoCo, the positive is also in the denominator (InfoNCE)."""
    q, k, queue = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
