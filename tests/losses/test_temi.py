"""TEMI's weighted beta-PMI against a loop written from its formula."""

import math

import pytest
import torch

from clusterlab.losses.temi import beta_pmi, teacher_agreement, temi_loss


def reference(qs, qsn, qt, qtn, prior, beta, weighted):
    """Per pair b and direction: -w_b log sum_k (q_s(k|x) q_t(k|x'))^beta / p(k), w_b = sum_k
    q_t(k|x) q_t(k|x'); the mean over the batch, then over the two directions."""
    batch, clusters = qs.shape
    directions = []
    for student, teacher in ((qs, qtn), (qsn, qt)):
        total = 0.0
        for b in range(batch):
            w = sum(float(qt[b, k] * qtn[b, k]) for k in range(clusters)) if weighted else 1.0
            inner = sum(float((student[b, k] * teacher[b, k]) ** beta / prior[k]) for k in range(clusters))
            total += -w * math.log(inner)
        directions.append(total / batch)
    return sum(directions) / 2


@pytest.mark.parametrize("beta, weighted", [(0.6, True), (1.0, True), (0.6, False)])
def test_the_loss_is_the_papers_weighted_beta_pmi(beta, weighted):
    torch.manual_seed(0)
    qs, qsn, qt, qtn = (torch.randn(6, 4).softmax(-1) for _ in range(4))
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4])
    weight = teacher_agreement(qt, qtn) if weighted else None
    got = temi_loss(qs, qsn, qt, qtn, prior, weight, beta)
    assert float(got) == pytest.approx(reference(qs, qsn, qt, qtn, prior, beta, weighted), rel=1e-5)


def test_beta_pmi_of_one_sure_cluster_is_minus_log_its_prior():
    one = torch.tensor([[1.0, 0.0, 0.0]])
    prior = torch.tensor([0.5, 0.25, 0.25])
    assert float(beta_pmi(one, one, prior, 0.6)) == pytest.approx(-math.log(0.5))
    # A rarer cluster (by the prior) carries more information: a larger PMI.
    rare = torch.tensor([[0.0, 1.0, 0.0]])
    assert float(beta_pmi(rare, rare, prior, 0.6)) > float(beta_pmi(one, one, prior, 0.6))
