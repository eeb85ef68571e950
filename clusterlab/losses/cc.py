"""Contrastive Clustering losses ("Contrastive Clustering", Li et al., AAAI 2021, arXiv:2009.09687)."""

from __future__ import annotations

from torch import Tensor

from clusterlab.losses.common import entropy, float32, nt_xent


def instance_loss(z_a: Tensor, z_b: Tensor, temperature: float = 0.5) -> Tensor:
    """L_ins, Eqs. 1-3: NT-Xent over the 2N instance projections of the two views.

    Eq. 2's denominator, read literally, also sums j = i of the same view; the text ("2N - 1
    pairs ... 2N - 2 negatives") and the authors' code leave that self-pair out, and so do we.
    """
    return nt_xent(z_a, z_b, temperature)


def cluster_loss(y_a: Tensor, y_b: Tensor, temperature: float = 1.0) -> Tensor:
    """First term of L_clu, Eqs. 4-6: NT-Xent over the 2M *columns* of the soft assignments.

    Column i of Y^a (cluster i's distribution over the batch) is pulled towards column i of Y^b
    and pushed from the other 2M - 2 columns, by cosine similarity over the batch.
    """
    return nt_xent(y_a.T, y_b.T, temperature)


@float32
def cluster_entropy(y_a: Tensor, y_b: Tensor) -> Tensor:
    """H(Y) of Eq. 6: entropy of the mean assignment P(y^k) of each view, summed over both views.

    Subtracted from the loss so that the batch does not collapse into a few clusters. The
    authors' code adds log M + sum p log p per view: the same up to the constant 2 log M.
    """
    return entropy(y_a.mean(0)) + entropy(y_b.mean(0))
