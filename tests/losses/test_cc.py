"""CC's losses (cc-paper Eqs. 1-7) against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from clusterlab.losses.cc import cluster_entropy, cluster_loss, instance_loss
from clusterlab.losses.common import entropy, nt_xent


def reference_nt_xent(u, v, tau):
    """Eqs. 2-3 (and 5-6) as loops: for each of the 2M rows, -log of the positive over all others."""
    rows = torch.cat([u, v])
    m = len(u)
    total = 0.0
    for i in range(2 * m):
        positive = i + m if i < m else i - m
        sims = [F.cosine_similarity(rows[i], rows[j], dim=0) / tau for j in range(2 * m) if j != i]
        denominator = sum(torch.exp(s) for s in sims)
        total += -torch.log(
            torch.exp(F.cosine_similarity(rows[i], rows[positive], dim=0) / tau) / denominator
        )
    return total / (2 * m)


def test_instance_loss_is_eqs_1_to_3():
    torch.manual_seed(0)
    z_a, z_b = torch.randn(6, 5), torch.randn(6, 5)
    assert instance_loss(z_a, z_b, 0.5) == pytest.approx(float(reference_nt_xent(z_a, z_b, 0.5)), rel=1e-5)


def test_cluster_loss_contrasts_columns_eqs_4_to_6():
    torch.manual_seed(1)
    y_a, y_b = torch.randn(8, 3).softmax(1), torch.randn(8, 3).softmax(1)
    expected = reference_nt_xent(y_a.T, y_b.T, 1.0)
    assert cluster_loss(y_a, y_b, 1.0) == pytest.approx(float(expected), rel=1e-5)


def test_cluster_loss_is_lowest_when_the_two_views_columns_agree():
    torch.manual_seed(2)
    y = torch.eye(4).repeat(5, 1) * 0.9 + 0.025  # 20 confident samples, 4 clusters
    agree = cluster_loss(y, y)
    swapped = cluster_loss(y, y[:, [1, 0, 2, 3]])  # the second view calls cluster 0 "1"
    assert agree < swapped


def test_entropy_term_is_maximal_for_uniform_marginals():
    uniform = torch.full((10, 4), 0.25)
    collapsed = torch.zeros(10, 4)
    collapsed[:, 0] = 1.0
    assert cluster_entropy(uniform, uniform) == pytest.approx(2 * math.log(4), rel=1e-6)
    assert cluster_entropy(collapsed, collapsed) == pytest.approx(0.0, abs=1e-6)
    assert entropy(torch.tensor([0.5, 0.5])) == pytest.approx(math.log(2))


def test_nt_xent_ignores_row_order_of_the_pairs():
    torch.manual_seed(3)
    u, v = torch.randn(7, 4), torch.randn(7, 4)
    perm = torch.randperm(7)
    assert nt_xent(u, v, 0.3) == pytest.approx(float(nt_xent(u[perm], v[perm], 0.3)), rel=1e-6)


def test_losses_run_in_float32_under_autocast():
    z = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = z.bfloat16()
        loss = instance_loss(low, low * 2)
        ent = cluster_entropy(low.softmax(1), low.softmax(1))
    assert loss.dtype == torch.float32 and ent.dtype == torch.float32
