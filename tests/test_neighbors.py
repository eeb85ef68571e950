"""The one kNN helper: faiss and torch backends agree, a row is never its own neighbour."""

import pytest
import torch

from clusterlab.neighbors import kmeans, knn


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_faiss_and_torch_backends_find_the_same_neighbours(metric):
    features = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    fi, fs = knn(features, 5, metric=metric, backend="faiss")
    ti, ts = knn(features, 5, metric=metric, backend="torch")
    assert torch.equal(fi, ti)
    torch.testing.assert_close(fs, ts, rtol=1e-4, atol=1e-4)
    assert not (fi == torch.arange(500)[:, None]).any()


def test_brute_force_cosine_neighbours():
    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    unit = torch.nn.functional.normalize(features, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2)
    assert torch.equal(knn(features, 3)[0], similarity.topk(3, dim=1).indices)


def test_queries_against_a_base_keep_their_own_rows():
    base = torch.eye(4)
    indices, _ = knn(base, 1, queries=base[[2, 0]])
    assert indices[:, 0].tolist() == [2, 0]


def test_kmeans_recovers_well_separated_blobs():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(
        150, 2, generator=torch.Generator().manual_seed(2)
    )
    assignments, found = kmeans(points, 3, seed=0)
    assert len(set(assignments.view(3, 50).mode(1).values.tolist())) == 3
    assert (assignments.view(3, 50) == assignments.view(3, 50)[:, :1]).all()


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_the_torch_search_leaves_each_row_out_in_every_block(metric):
    """Blocks of 64 queries: row i's own score is masked at column i, whatever block it is in."""
    from clusterlab.neighbors import _torch_search

    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(3))
    blocked, _ = _torch_search(features, features, 5, metric, exclude_self=True, block=64)
    assert torch.equal(blocked, knn(features, 5, metric=metric, backend="faiss")[0])
