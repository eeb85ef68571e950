"""The one kNN helper: faiss and torch backends agree, a row is never its own neighbour, the torch
search stays within its memory budget; k-means trains on a seeded subsample of a large set."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from clusterlab.neighbors import _BYTES_PER_PAIR, free_memory, kmeans, knn, query_block, search_block


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


def test_the_query_block_is_the_most_rows_whose_scores_and_topk_fit_the_budget():
    # 20 bytes per (query, base row): a 4-byte score and topk's 16-byte (value, int64 index) pair.
    assert _BYTES_PER_PAIR == 20
    assert query_block(200_000, 160 << 20, 5_000) == (160 << 20) // (20 * 200_000) == 41
    assert query_block(1_000_000, 4 << 30, 1_000_000) == 214  # 4 GiB at 1M rows, not 4,096 (82 GB)
    assert query_block(1_000_000, 10, 1_000_000) == 1  # a budget below one row still searches
    assert query_block(1_000, 1 << 40, 300) == 300  # never more rows than queries
    assert 0 < free_memory(torch.device("cpu"))
    # knn's block: the budget less the float32 copies (4(N + Q)D) and the result (12Qk)
    cpu = torch.device("cpu")
    assert (
        search_block(200_000, 5_000, 64, 10, cpu, 160 << 20)
        == 28
        == query_block(200_000, (160 << 20) - 4 * 205_000 * 64 - 12 * 5_000 * 10, 5_000)
    )
    assert search_block(2_000, 256, 64, 10, cpu) == 256  # a small search (10 MB) is one block


_PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import torch
    torch.set_num_threads(1)
    from clusterlab.neighbors import knn
    budget = int(sys.argv[1])
    features = torch.randn(200_000, 64, generator=torch.Generator().manual_seed(0))
    knn(features[:2_000], 10, queries=features[:10], backend="torch")  # lazy initialisation, small
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    indices, _ = knn(features, 10, queries=features[:5_000], backend="torch", memory_budget=budget)
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    same = torch.equal(indices, knn(features, 10, queries=features[:5_000], backend="faiss")[0])
    print(growth, same)
    """
)


def test_the_torch_search_of_200k_vectors_stays_within_its_memory_budget():
    """Peak RSS growth of a search of 5,000 queries against 200,000 x 64 features (float32 copies
    of 51 MB and 1.3 MB, a 0.6 MB result, then blocks of 28 queries: 120 MB measured) is within
    the budget plus the result and 32 MiB of slack (allocator, BLAS). The former fixed blocks of
    4,096 queries hold 3.3 GB of scores each."""
    budget, slack, result = 160 << 20, 32 << 20, 5_000 * 10 * 12
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(budget)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    growth, same = done.stdout.split()
    assert same == "True"  # the blocked search finds faiss's neighbours
    assert int(growth) < budget + result + slack
    assert 4_096 * 200_000 * 4 > budget + result + slack  # the old blocks would not have fitted


def test_kmeans_of_more_than_max_points_trains_on_a_seeded_subsample_and_assigns_every_row():
    x = torch.randn(3_000, 8, generator=torch.Generator().manual_seed(4))
    assignments, centroids = kmeans(x, 4, seed=5, n_init=2, iterations=10, max_points=1_000)
    rows = np.sort(np.random.default_rng(5).choice(3_000, 1_000, replace=False))
    _, trained = kmeans(x[rows], 4, seed=5, n_init=2, iterations=10, max_points=1_000)
    assert torch.equal(centroids, trained)  # the centres are those of the subsample
    assert assignments.shape == (3_000,)  # and every row is assigned to its nearest one
    assert torch.equal(assignments, torch.cdist(x, centroids).argmin(1))
    again = kmeans(x, 4, seed=5, n_init=2, iterations=10, max_points=1_000)
    assert torch.equal(again[0], assignments) and torch.equal(again[1], centroids)
    other = kmeans(x, 4, seed=6, n_init=2, iterations=10, max_points=1_000)[1]
    assert not torch.equal(other, centroids)  # another seed, another subsample


def test_kmeans_of_at_most_max_points_is_faiss_on_every_row_as_before():
    """Up to max_points rows the call is the one the recorded results were made with."""
    x = torch.randn(1_797, 64, generator=torch.Generator().manual_seed(6))  # as many rows as digits
    assignments, centroids = kmeans(x, 10, seed=3, max_points=1_797)
    before = faiss.Kmeans(
        64,
        10,
        niter=100,
        nredo=10,
        seed=3,
        gpu=False,
        max_points_per_centroid=max(256, 1_797 // 10 + 1),
        min_points_per_centroid=1,
    )
    before.train(x.numpy())
    _, assigned = before.index.search(x.numpy(), 1)
    assert torch.equal(centroids, torch.from_numpy(before.centroids))
    assert torch.equal(assignments, torch.from_numpy(assigned[:, 0]).long())


def test_the_torch_search_scores_in_float32_under_a_callers_autocast():
    """NNM searches inside its training step, under bf16 autocast in the GPU configs: the scores and
    so the ranking stay float32 (and the result buffers take them)."""
    features = torch.randn(50, 8)
    expected = knn(features, 3, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        indices, scores = knn(features, 3, backend="torch")
    assert scores.dtype == torch.float32
    assert torch.equal(indices, expected[0]) and torch.equal(scores, expected[1])
