"""DCCM's losses (dccm-paper Eqs. 1-15) against values computed by hand."""

import math

import pytest
import torch

from clusterlab.losses.dccm import (
    mutual_information_loss,
    pseudo_graph,
    pseudo_graph_loss,
    pseudo_label_loss,
    pseudo_labels,
    triplet_pairs,
)
from clusterlab.metrics import graph_bcubed
from clusterlab.nn import LocalDiscriminator

# Three predictions z (Eq. 1): the first two agree, the third is another cluster.
Z = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])


# Their cosine similarities, written out: S_12 = (.72 + .02) / sqrt(.82 * .68), ...
S12 = 0.74 / math.sqrt(0.82 * 0.68)  # 0.99099


S13 = 0.18 / 0.82  # 0.21951


S23 = 0.26 / math.sqrt(0.68 * 0.82)  # 0.34818


def test_pseudo_graph_thresholds_cosine_similarity_eq_2():
    expected = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(pseudo_graph(Z, 0.95), expected)
    # S_23 = 0.348 clears a threshold of 0.3, S_13 = 0.220 does not.
    assert pseudo_graph(Z, 0.3)[1, 2] and not pseudo_graph(Z, 0.3)[0, 2]


def test_pseudo_graph_loss_is_bce_of_similarity_against_w_eq_3():
    logits = Z.log()  # softmax(log z) = z
    graph = pseudo_graph(Z, 0.95)
    # Mean over the 6 ordered pairs i != j: W_12 = 1, W_13 = W_23 = 0.
    expected = (-math.log(S12) - math.log(1 - S13) - math.log(1 - S23)) / 3
    assert float(pseudo_graph_loss(logits, graph)) == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.228292, rel=1e-5)


def test_pseudo_graph_loss_is_lowest_when_predictions_follow_the_graph():
    graph = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    follows = torch.tensor([[8.0, 0.0], [8.0, 0.0], [0.0, 8.0]])
    against = torch.tensor([[8.0, 0.0], [0.0, 8.0], [0.0, 8.0]])
    assert pseudo_graph_loss(follows, graph) < 0.01 < pseudo_graph_loss(against, graph)


def test_pseudo_labels_are_argmax_with_confidence_mask_eqs_7_8():
    probs = torch.tensor([[0.95, 0.05], [0.6, 0.4], [0.05, 0.95]])
    labels, confident = pseudo_labels(probs, 0.9)
    assert labels.tolist() == [0, 0, 1] and confident.tolist() == [True, False, True]


def test_pseudo_label_loss_weights_cross_entropy_by_confidence_eq_9():
    probs = torch.tensor([[0.92, 0.05, 0.03], [0.5, 0.3, 0.2], [0.03, 0.05, 0.92]])
    labels, confident = pseudo_labels(probs, 0.9)  # [0, 0, 2], [1, 0, 1]
    # Cross-entropy of the two confident samples, mean over all three.
    expected_ce = 2 * -math.log(0.92) / 3
    assert float(pseudo_label_loss(probs.log(), labels, confident)) == pytest.approx(expected_ce, rel=1e-5)
    # The authors' code: BCE of each class against the one-hot label, mean over the classes.
    per_sample = (-math.log(0.92) - math.log(0.95) - math.log(0.97)) / 3
    got = pseudo_label_loss(probs.log(), labels, confident, criterion="bce")
    assert float(got) == pytest.approx(2 * per_sample / 3, rel=1e-5)


def test_mutual_information_loss_is_the_jsd_estimator_eqs_13_14():
    joint, marginal = torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 2.0])
    # E_J[sp(-T)] + E_M[sp(T)], sp(z) = log(1 + e^z)
    expected = (math.log(2) + math.log(1 + math.exp(-1))) / 2 + (
        math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))
    ) / 2
    assert float(mutual_information_loss(joint, marginal)) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.723299, rel=1e-6)
    # A discriminator that tells joint from marginal pairs apart gives a lower loss (a higher MI).
    assert mutual_information_loss(torch.full((4,), 5.0), torch.full((4,), -5.0)) < 0.02
    # No negatives in the batch: the marginal expectation contributes nothing, not a NaN.
    assert float(mutual_information_loss(joint, torch.zeros(0))) == pytest.approx(
        (math.log(2) + math.log(1 + math.exp(-1))) / 2
    )


def test_discriminator_scores_the_deep_vector_tiled_over_every_position_of_the_shallow_map():
    torch.manual_seed(0)
    T = LocalDiscriminator(deep_dim=3, shallow_dim=4, hidden_dim=8)
    deep, shallow = torch.randn(2, 3), torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        scores = T(deep, shallow)
    assert scores.shape == (2, 5, 6)
    # At position (1, 2) of sample 1: the three 1x1 convs applied to [d_1; s_1[:, 1, 2]].
    x = torch.cat([deep[1], shallow[1, :, 1, 2]])
    with torch.no_grad():
        for layer in T.net:
            x = (
                torch.relu(x)
                if isinstance(layer, torch.nn.ReLU)
                else layer.weight[:, :, 0, 0] @ x + layer.bias
            )
    assert float(scores[1, 1, 2]) == pytest.approx(float(x), rel=1e-5)


def random_graph(n: int, generator: torch.Generator) -> torch.Tensor:
    """A symmetric pseudo-graph: a few dense groups plus random edges, W_ii = 1."""
    groups = torch.randint(0, 4, (n,), generator=generator)
    noise = torch.rand(n, n, generator=generator) < 0.1
    graph = (groups[:, None] == groups[None, :]) ^ (noise | noise.T)
    return graph | torch.eye(n, dtype=torch.bool)


def test_negatives_are_never_pseudo_graph_positives_and_positives_always_are():
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        n = int(torch.randint(2, 40, (1,), generator=generator))
        graph = random_graph(n, generator)
        scores = torch.rand(n, n, generator=generator)
        positive, positive_valid, negatives, negatives_valid = triplet_pairs(graph, scores, num_negatives=3)
        eye = torch.eye(n, dtype=torch.bool)
        for i in range(n):
            chosen = negatives[i][negatives_valid[i]]
            assert not graph[i, chosen].any(), f"trial {trial}: a negative of {i} is a pseudo-graph positive"
            assert len(set(chosen.tolist())) == len(chosen)  # drawn without replacement
            assert int(negatives_valid[i].sum()) == min(3, int((~graph[i]).sum()))  # as many as exist
        assert torch.equal(positive_valid, (graph & ~eye).any(1))
        assert graph[torch.arange(n), positive][positive_valid].all()
        assert (positive != torch.arange(n))[positive_valid].all()  # never the anchor itself


def test_negatives_are_drawn_uniformly_among_the_eligible():
    # Anchor 0 has 4 eligible negatives (2..5); sample 1 is its positive. The authors' code would
    # take the same two every time; a uniform draw takes each in half of the draws.
    graph = torch.zeros(6, 6, dtype=torch.bool)
    graph[0, 1] = graph[1, 0] = True
    graph |= torch.eye(6, dtype=torch.bool)
    generator = torch.Generator().manual_seed(1)
    counts = torch.zeros(6)
    for _ in range(2000):
        _, _, negatives, valid = triplet_pairs(graph, torch.rand(6, 6, generator=generator), num_negatives=2)
        counts[negatives[0][valid[0]]] += 1
    assert counts[:2].sum() == 0
    torch.testing.assert_close(counts[2:] / 2000, torch.full((4,), 0.5), atol=0.05, rtol=0)


def test_graph_bcubed_precision_and_recall():
    labels = torch.tensor([0, 0, 1])
    exact = pseudo_graph(Z, 0.95)
    assert [float(v) for v in graph_bcubed(exact, labels)] == [1.0, 1.0]
    everything = torch.ones(3, 3, dtype=torch.bool)  # precision 2/3, 2/3, 1/3; recall 1
    precision, recall = graph_bcubed(everything, labels)
    assert float(precision) == pytest.approx(5 / 9) and float(recall) == 1.0
    nothing = torch.zeros(3, 3, dtype=torch.bool)  # each sample alone: precision 1, recall 1/2, 1/2, 1
    precision, recall = graph_bcubed(nothing, labels)
    assert float(precision) == 1.0 and float(recall) == pytest.approx(2 / 3)


def test_losses_run_in_float32_under_autocast():
    logits = torch.randn(6, 4)
    graph = pseudo_graph(logits.softmax(1), 0.5)
    labels, confident = pseudo_labels(logits.softmax(1), 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = logits.bfloat16()
        assert pseudo_graph_loss(low, graph).dtype == torch.float32
        assert pseudo_label_loss(low, labels, confident).dtype == torch.float32
        assert mutual_information_loss(low[:, 0], low[:, 1]).dtype == torch.float32


@pytest.mark.parametrize("num_clusters", [10, 20])
def test_the_papers_cross_entropy_weighs_the_pseudo_labels_about_k_over_2_times_the_authors_bce(num_clusters):
    """The authors' code (WeightedBCE, coefficient 5) averages the BCE over the K classes; for a
    confident prediction the K - 1 wrong classes add about what the right one does, so its term is
    about 2/K of the cross-entropy (Eq. 9 read as the paper writes it), with the same alpha: the
    default weighs the pseudo labels 5x (K = 10) to 10x (K = 20) what the authors' runs did;
    `pseudo_label_criterion: bce` is the authors' weighting."""
    torch.manual_seed(0)
    logits = torch.randn(64, num_clusters)
    logits[torch.arange(64), torch.randint(num_clusters, (64,))] += 8.0  # confident predictions
    labels, confident = pseudo_labels(logits.softmax(1), 0.9)
    ce = pseudo_label_loss(logits, labels, confident)
    bce = pseudo_label_loss(logits, labels, confident, criterion="bce")
    assert float(ce / bce) == pytest.approx(num_clusters / 2, rel=0.15)
