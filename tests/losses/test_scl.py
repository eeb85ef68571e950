"""SCL's losses (scl-paper Eqs. 1-7) against values computed by hand."""

import math

import pytest
import torch

from clusterlab.losses.scl import (
    cluster_size_weights,
    concept_loss,
    contrastive_set,
    hard_sample_weights,
    instance_loss,
    memory_logits,
)

E = math.e


def unit(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_contrastive_set_holds_every_queue_but_the_samples_own_cluster():
    queue_of_slot = torch.tensor([0, 0, 1, 1, 2, 2])
    labels = torch.tensor([1, 0, 2])
    expected = torch.tensor([[1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(contrastive_set(queue_of_slot, labels), expected)


def test_instance_level_contrastive_set_leaves_out_only_the_samples_own_older_keys():
    key_owner = torch.tensor([-1, 7, 3, 7])  # sample index of each stored key (-1: initial key)
    assert torch.equal(
        contrastive_set(key_owner, torch.tensor([7, 3])),
        torch.tensor([[1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool),
    )


def test_instance_loss_eq1_by_hand():
    # q = k = e1; the memory: queue 0 holds e2, queue 1 holds -e1. tau = 1.
    q = unit([1, 0], [1, 0])
    memory = unit([0, 1], [-1, 0])
    negatives = contrastive_set(torch.tensor([0, 1]), torch.tensor([0, 1]))
    # sample 0 (cluster 0): Q = {-e1}: -log(e^1 / (e^1 + e^-1)) = log(1 + e^-2)
    # sample 1 (cluster 1): Q = {e2}:  -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)
    per_sample = torch.tensor([math.log(1 + E**-2), math.log(1 + E**-1)])
    loss = instance_loss(q, q.clone(), memory, negatives, temperature=1.0)
    assert loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    # Eq. 7: the weighted sum
    weights = torch.tensor([0.25, 0.75])
    weighted = instance_loss(q, q.clone(), memory, negatives, temperature=1.0, weights=weights)
    assert weighted.item() == pytest.approx((weights * per_sample).sum().item(), rel=1e-6)


def test_instance_loss_uses_cosine_similarity_and_the_temperature():
    q, k = unit([3, 0]), unit([2, 0])  # not unit length: cosine similarity normalises them
    memory = unit([0, 5])
    loss = instance_loss(q, k, memory, torch.ones(1, 1, dtype=torch.bool), temperature=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-10)), abs=1e-6)  # float32 near 0


def test_the_own_clusters_queue_does_not_change_the_instance_loss_or_receive_gradient():
    torch.manual_seed(0)
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8)
    memory = torch.randn(3, 5, 8, requires_grad=True)  # 3 queues of 5
    labels = torch.tensor([1, 1, 1, 1])
    queue_of_slot = torch.arange(3).repeat_interleave(5)
    negatives = contrastive_set(queue_of_slot, labels)
    loss = instance_loss(q, k, memory.flatten(0, 1), negatives, 0.1)
    loss.backward()
    assert (
        torch.all(memory.grad[1] == 0) and torch.all(memory.grad[0] != 0) and torch.all(memory.grad[2] != 0)
    )
    # Even the queries themselves in the own queue (the strongest possible pull) change nothing.
    changed = memory.detach().clone()
    changed[1, :4] = q.detach()
    assert instance_loss(q, k, changed.flatten(0, 1), negatives, 0.1).item() == pytest.approx(
        loss.item(), rel=1e-6
    )
    changed[2, 0] = q.detach()[0]
    assert instance_loss(q, k, changed.flatten(0, 1), negatives, 0.1).item() != pytest.approx(
        loss.item(), rel=1e-3
    )


def test_memory_assignment_eq3_by_hand():
    q = unit([1, 0])
    memory = torch.stack([unit([1, 0], [0, 1]), unit([-1, 0], [0, -1])])  # 2 clusters x 2 keys
    p = memory_logits(q, memory, temperature=1.0).softmax(1)
    cluster0, cluster1 = E + 1, E**-1 + 1  # sum over each queue of exp(cos / tau)
    assert p[0].tolist() == pytest.approx(
        [cluster0 / (cluster0 + cluster1), cluster1 / (cluster0 + cluster1)], rel=1e-6
    )


def test_concept_loss_eq4_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])  # p = (1/4, 3/4), (3/4, 1/4)
    target = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    expected = (-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) - math.log(0.75)) / 2
    assert concept_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_concept_loss_trains_the_classifier_not_the_memory_target():
    logits = torch.zeros(2, 3, requires_grad=True)
    target = torch.full((2, 3), 1 / 3, requires_grad=True)
    concept_loss(logits, target).backward()
    assert target.grad is None and logits.grad is not None


def test_cluster_size_weights_are_odcs_inverse_square_root_of_the_cluster_size():
    sizes = torch.tensor([100, 25, 4, 0])  # an empty cluster has no sample to weigh
    weights = cluster_size_weights(torch.tensor([0, 1, 2, 2]), sizes)
    assert weights.tolist() == pytest.approx([0.1, 0.2, 0.5, 0.5])


def test_size_weighted_concept_loss_is_the_weighted_mean_of_eq4():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])
    target = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    per_sample = [-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), -math.log(0.75)]
    weights = torch.tensor([0.1, 0.3])
    expected = (0.1 * per_sample[0] + 0.3 * per_sample[1]) / 0.4
    assert concept_loss(logits, target, weights).item() == pytest.approx(expected, rel=1e-6)
    # Equal weights: Eq. 4's plain mean.
    assert concept_loss(logits, target, torch.full((2,), 0.7)).item() == pytest.approx(
        concept_loss(logits, target).item(), rel=1e-6
    )


def test_hard_sample_weights_eq6_by_hand():
    assert hard_sample_weights(torch.tensor([0, 1, 3])).tolist() == pytest.approx([0.0, 0.25, 0.75])
    # Before any label has changed: the plain batch mean.
    assert hard_sample_weights(torch.tensor([0, 0, 0, 0])).tolist() == pytest.approx([0.25] * 4)
