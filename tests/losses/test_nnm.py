"""NNM's losses (nnm-paper Eqs. 2-5) against values computed by hand."""

import math

import pytest
import torch

from clusterlab.losses.nnm import class_contrastive_loss, consistency_loss, entropy_loss, moco_loss


def test_consistency_loss_is_minus_log_of_the_dot_product_eq_3():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    p = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    # <a_1, p_1> = 0.8 and <a_2, p_2> = 0.25 + 0.25 = 0.5
    assert consistency_loss(a, p) == pytest.approx(-(math.log(0.8) + math.log(0.5)) / 2, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_class_contrastive_loss_contrasts_cluster_columns_eq_4(tau):
    a = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    p = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    # columns: a_1 = (.8, .4), a_2 = (.2, .6); p_1 = (.6, .2), p_2 = (.4, .8); cosine similarities:
    s11 = (0.8 * 0.6 + 0.4 * 0.2) / (math.sqrt(0.8) * math.sqrt(0.4))
    s12 = (0.8 * 0.4 + 0.4 * 0.8) / (math.sqrt(0.8) * math.sqrt(0.8))
    s21 = (0.2 * 0.6 + 0.6 * 0.2) / (math.sqrt(0.4) * math.sqrt(0.4))
    s22 = (0.2 * 0.4 + 0.6 * 0.8) / (math.sqrt(0.4) * math.sqrt(0.8))
    first = -math.log(math.exp(s11 / tau) / (math.exp(s11 / tau) + math.exp(s12 / tau)))
    second = -math.log(math.exp(s22 / tau) / (math.exp(s21 / tau) + math.exp(s22 / tau)))
    assert class_contrastive_loss(a, p, tau) == pytest.approx((first + second) / 2, rel=1e-6)


def test_entropy_loss_is_minus_the_entropy_of_the_mean_assignment_eq_5():
    uniform = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    # mean = (1/3, 1/3, 1/6, 1/6)
    expected = 2 * (1 / 3) * math.log(1 / 3) + 2 * (1 / 6) * math.log(1 / 6)
    assert entropy_loss(uniform) == pytest.approx(expected, rel=1e-6)
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert entropy_loss(collapsed) == pytest.approx(0.0, abs=1e-6)


def test_moco_loss_contrasts_the_key_with_the_queue_eq_2():
    q, k = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 3.0], [-1.0, 0.0]])  # cosine similarities 0 and -1
    expected = -math.log(math.e / (math.e + 1 + math.exp(-1)))
    assert moco_loss(q, k, queue, 1.0) == pytest.approx(expected, rel=1e-6)
