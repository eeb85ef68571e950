"""TEMI's objective ("Exploring the Limits of Deep Image Clustering using Pretrained Models",
Adaloglou et al., BMVC 2023, arXiv:2303.17896): a weighted pointwise mutual information between
the clusters of an image and of one of its nearest neighbours in a pretrained feature space.

Each function takes probabilities over the C clusters (rows are samples) of the already gathered
global batch: q_s from a student head, q_t from its teacher (the student's moving average).
The formulas follow the paper's terms as its authors' code (Apache-2.0) computes them.
"""

from __future__ import annotations

from torch import Tensor

from clusterlab.losses.common import float32


@float32
def beta_pmi(q_student: Tensor, q_teacher: Tensor, prior: Tensor, beta: float) -> Tensor:
    """pmi^beta(x, x') = log sum_k (q_s(k|x) q_t(k|x'))^beta / p~(k), per sample (B).

    beta = 1 is the plain PMI of the two cluster distributions under the cluster prior p~; beta < 1
    (0.6 in the paper) lifts the small joint probabilities, which keeps a confident wrong pair from
    dominating and the clusters from collapsing onto few (the paper's beta-PMI)."""
    return ((q_student * q_teacher).pow(beta) / prior).sum(-1).log()


@float32
def teacher_agreement(q_teacher: Tensor, q_teacher_neighbor: Tensor) -> Tensor:
    """w(x, x') = sum_k q_t(k|x) q_t(k|x'), per sample (B): how surely the teacher puts an image
    and its neighbour in one cluster. It weighs each pair's term (the instance weighting): a pair
    the teacher splits (a false neighbour) counts little."""
    return (q_teacher * q_teacher_neighbor).sum(-1)


@float32
def temi_loss(
    q_student: Tensor,
    q_student_neighbor: Tensor,
    q_teacher: Tensor,
    q_teacher_neighbor: Tensor,
    prior: Tensor,
    weight: Tensor | None,
    beta: float,
) -> Tensor:
    """One head's loss: -w(x, x') pmi^beta, each student view against the teacher of the other view
    (x against x' and x' against x), averaged over the batch and the two directions. `weight`: w per
    sample, or None for the unweighted loss (every pair counts 1)."""
    terms = (
        beta_pmi(q_student, q_teacher_neighbor, prior, beta),
        beta_pmi(q_student_neighbor, q_teacher, prior, beta),
    )
    if weight is not None:
        terms = tuple(weight * term for term in terms)
    return -(terms[0].mean() + terms[1].mean()) / 2
