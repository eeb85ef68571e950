"""Deep Comprehensive Correlation Mining losses ("Deep Comprehensive Correlation Mining for Image
Clustering", Wu et al., ICCV 2019, arXiv:1904.06925).

Pure functions of tensors of the *global* batch (gathered over ranks with
clusterlab.distributed.gather), so that the pseudo-graph spans every process. `logits` are the
network's pre-softmax outputs Y; the prediction feature is z = softmax(Y) (Eq. 1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from clusterlab.losses.common import float32


def cosine_similarity(probs: Tensor) -> Tensor:
    """S_ij = z_i . z_j / (|z_i| |z_j|), the similarity the pseudo-graph thresholds (Sec. 3.1)."""
    unit = F.normalize(probs, dim=1)
    return unit @ unit.T


@torch.no_grad()
def pseudo_graph(probs: Tensor, threshold: float = 0.95) -> Tensor:
    """W, Eq. 2: W_ij = 1 where S_ij >= thres_1 (0.95), a boolean N x N matrix (W_ii = 1)."""
    graph = cosine_similarity(probs.float()) >= threshold
    return graph | torch.eye(len(probs), dtype=torch.bool, device=probs.device)


@torch.no_grad()
def pseudo_labels(probs: Tensor, threshold: float = 0.9) -> tuple[Tensor, Tensor]:
    """y_i = argmax_k z_ik (Eq. 7) and the confidence mask V_i = [max_k z_ik >= thres_2] (Eq. 8, 0.9)."""
    confidence, labels = probs.max(1)
    return labels, confidence >= threshold


@float32
def pseudo_graph_loss(logits: Tensor, graph: Tensor, eps: float = 1e-7) -> Tensor:
    """L_PG, Eq. 3 (L'_PG of Eq. 12 on the transformed images): l_g is the binary cross-entropy
    between the similarity S_ij of the predictions and W_ij (DAC's choice, footnote 2), averaged
    over the ordered pairs i != j (a sample's similarity with itself is 1 whatever the weights).
    """
    similarity = cosine_similarity(logits.softmax(1)).clamp(eps, 1 - eps)
    pairs = 1.0 - torch.eye(len(logits), device=logits.device)
    bce = F.binary_cross_entropy(similarity, graph.float(), reduction="none")
    return (bce * pairs).sum() / pairs.sum()


@float32
def pseudo_label_loss(
    logits: Tensor,
    labels: Tensor,
    confident: Tensor,
    criterion: Literal["cross_entropy", "bce"] = "cross_entropy",
    eps: float = 1e-7,
) -> Tensor:
    """L_PL, Eq. 9 (L'_PL of Eq. 12 on the transformed images): sum_i V_i l_l(f(x_i), y_i) / N.

    criterion="cross_entropy": l_l is the cross-entropy, as the paper says. "bce": the authors'
    code, the binary cross-entropy of every class probability against the one-hot label, averaged
    over the classes. Either way the mean is over all N samples, confident or not (as the code).
    """
    if criterion == "cross_entropy":
        per_sample = F.cross_entropy(logits, labels, reduction="none")
    else:
        one_hot = F.one_hot(labels, logits.shape[1]).float()
        per_sample = F.binary_cross_entropy(
            logits.softmax(1).clamp(eps, 1 - eps), one_hot, reduction="none"
        ).mean(1)
    return (confident.float() * per_sample).mean()


@torch.no_grad()
def triplet_pairs(
    graph: Tensor, scores: Tensor, num_negatives: int = 2
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1, line 6: select positive and negative pairs based on W, for each anchor i.

    Positive: one j != i with W_ij = 1; negatives: `num_negatives` k with W_ik = 0. Among the
    eligible, the ones with the lowest `scores[i]` are taken: with i.i.d. uniform scores, a uniform
    draw without replacement. (The authors' code takes the next indices instead, and offsets the
    positive's index by one: not copied.) An anchor may have no positive besides itself, or fewer
    negatives than asked for: the `*_valid` masks say which pairs exist.

    Returns:
        positive (N), positive_valid (N), negatives (N x k), negatives_valid (N x k), with k =
        min(num_negatives, N).
    """
    eye = torch.eye(len(graph), dtype=torch.bool, device=graph.device)
    inf = torch.tensor(float("inf"), device=scores.device)
    positive_score, positive = torch.where(graph & ~eye, scores, inf).min(1)
    k = min(num_negatives, len(graph))
    negative_scores, negatives = torch.where(~graph & ~eye, scores, inf).topk(k, dim=1, largest=False)
    return positive, positive_score.isfinite(), negatives, negative_scores.isfinite()


@float32
def mutual_information_loss(
    joint_scores: Tensor,
    marginal_scores: Tensor,
    joint_weights: Tensor | None = None,
    marginal_weights: Tensor | None = None,
) -> Tensor:
    """L_MI, Eqs. 13-14: minus the Jensen-Shannon MI estimate between deep and shallow features,

        L_MI = -(E_J[-sp(-T(d, s))] - E_M[sp(T(d, s))]) = E_J[sp(-T(d, s))] + E_M[sp(T(d, s))],

    with the discriminator's scores T of the joint pairs (same image, pseudo-graph positives) and
    of the marginal pairs (pseudo-graph negatives), at every position of the shallow map. An
    expectation over no pairs (a batch without negatives) contributes 0.

    `*_weights` (one per pair, 0 or 1) say which rows are pairs: a fixed number of rows, with
    the missing pairs weighted 0, keeps the host from waiting to learn how many pairs exist.
    """

    def mean(x: Tensor, weights: Tensor | None) -> Tensor:
        if weights is None:
            return x.mean() if x.numel() else x.sum()
        weights = weights.to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        positions = x[0].numel() if len(x) else 1
        return (weights * x).sum() / (weights.sum() * positions).clamp_min(1)

    joint, marginal = F.softplus(-joint_scores), F.softplus(marginal_scores)
    return mean(joint, joint_weights) + mean(marginal, marginal_weights)
