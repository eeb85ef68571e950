"""Semantic Contrastive Learning losses ("Deep Clustering by Semantic Contrastive Learning",
Huang & Gong, 2021, arXiv:2103.02662).

Pure functions of already-gathered tensors: q and k are the global batch's query and key
representations, `memory` the semantic memory's keys, which are identical on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterlab.losses.common import float32


def contrastive_set(memory_owner: Tensor, owner: Tensor) -> Tensor:
    """Q_i, Eq. 2: which memory keys are negatives of sample i (B x M, True = in the set).

    A key is in Q_i unless it belongs to sample i's own cluster: `memory_owner` is the cluster of
    every memory key and `owner` the pseudo label y_i of every sample. Instance-level
    over-clustering uses the same rule with each sample its own cluster (owners = sample indices),
    so a sample's own older keys are never its negatives.
    """
    return memory_owner[None, :] != owner[:, None]


def hard_sample_weights(changes: Tensor) -> Tensor:
    """w_i, Eq. 6: label-change count s_i over the sum of the counts in the mini-batch.

    The paper re-weights "the samples within the same mini-batches" (Sec. 4.2), so the sum runs
    over the (global) batch. Before any sample has changed its label the weights are uniform,
    which is the plain batch mean (Table 3's "without re-weighting").
    """
    s = changes.float()
    total = s.sum()
    # Selected on the device: `if total > 0` would make the host wait for it every step.
    return torch.where(total > 0, s / total, torch.full_like(s, 1.0 / len(s)))


@float32
def instance_loss(
    q: Tensor,
    k: Tensor,
    memory: Tensor,
    negatives: Tensor,
    temperature: float = 0.1,
    weights: Tensor | None = None,
) -> Tensor:
    """Cross-cluster instance discrimination, Eqs. 1 and 7: sum_i w_i (-log MI(I_i)).

    MI(I_i) = exp(cos(q_i, k_i) / tau) / sum over {k_i} and Q_i of exp(cos(q_i, k) / tau) (Eq. 1).
    `memory` holds the M stored keys, `negatives` (B x M) says which are in Q_i (see
    `contrastive_set`). `weights` default to 1/B: the mean over the batch.
    """
    q, k, memory = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(memory, dim=1)
    positive = (q * k).sum(1, keepdim=True) / temperature
    negative = (q @ memory.T / temperature).masked_fill(~negatives, float("-inf"))
    minus_log_mi = -torch.cat([positive, negative], 1).log_softmax(1)[:, 0]  # -log MI(I_i), Eq. 1
    if weights is None:
        weights = torch.full_like(minus_log_mi, 1.0 / len(minus_log_mi))
    return (weights * minus_log_mi).sum()  # Eq. 7


@float32
def memory_logits(q: Tensor, memory: Tensor, temperature: float = 0.1) -> Tensor:
    """log sum_{k in M_j} exp(cos(q_i, k) / tau) for every cluster j: B x C.

    Their softmax over the clusters is the memory's soft assignment p~_ij of Eq. 3.
    `memory` is the semantic memory's keys, C x L x D.
    """
    q, memory = F.normalize(q, dim=1), F.normalize(memory, dim=-1)
    return torch.einsum("bd,cld->bcl", q, memory).div(temperature).logsumexp(-1)


@float32
def concept_loss(logits: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """L_xent, Eq. 4: -1/n sum_i sum_j p~_ij log p_ij.

    `logits` are the classifier's W_j^T q_i + B_j; the log of Eq. 4 needs probabilities, so p is
    their softmax. `target` is p~ (Eq. 3), a fixed target: the loss trains the decision
    boundaries (and, through q, the encoder) to agree with the memory, not the memory to agree
    with them. `weights` (one per sample, e.g. `cluster_size_weights`) make it a weighted mean.
    """
    per_sample = -(target.detach() * logits.log_softmax(1)).sum(1)
    if weights is None:
        return per_sample.mean()
    return (weights * per_sample).sum() / weights.sum()


def cluster_size_weights(labels: Tensor, sizes: Tensor, power: float = 0.5) -> Tensor:
    """ODC's loss re-weighting (Zhan et al., CVPR 2020, Sec. 3.3), which SCL follows "to avoid
    extremely imbalanced cluster assignments" (Sec. 4): a sample of pseudo label c weighs
    n_c^-power (power 0.5), n_c the size of cluster c, so that a grown cluster's samples pull the
    classifier less and a shrunk one's more."""
    return sizes.float().clamp(min=1).pow(-power)[labels]
