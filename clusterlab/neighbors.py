"""Nearest neighbours and k-means on feature matrices, through faiss.

The one place that searches neighbours (NNM's mining and global neighbours, diagnostics) or runs
k-means (the k-means baseline, CC's "ICH only" ablation). A GPU index is used when the installed
faiss has GPU support and a GPU is visible; otherwise the CPU one.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
from torch import Tensor


def _as_faiss(x: Tensor | np.ndarray) -> np.ndarray:
    x = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)


def faiss_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def knn(features: Tensor | np.ndarray, k: int, queries: Tensor | np.ndarray | None = None,
        metric: str = "cosine", exclude_self: bool = True) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The k nearest rows of `features` for each query (default: each row of `features`).

    metric: "cosine" (rows L2-normalised, inner product) or "l2". With queries = features and
    exclude_self, a row is not its own neighbour. Returns (indices, similarities-or-distances),
    both N x k, nearest first.
    """
    base = _as_faiss(features)
    query = base if queries is None else _as_faiss(queries)
    if metric == "cosine":
        base = base / np.maximum(np.linalg.norm(base, axis=1, keepdims=True), 1e-12)
        query = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
        index = faiss.IndexFlatIP(base.shape[1])
    elif metric == "l2":
        index = faiss.IndexFlatL2(base.shape[1])
    else:
        raise ValueError(f"metric must be 'cosine' or 'l2', not {metric!r}")
    if faiss_gpus():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(base)
    skip = int(exclude_self and queries is None)
    scores, indices = index.search(query, k + skip)
    if skip:  # drop each row itself (wherever ties put it), keep k others
        own = indices == np.arange(len(query))[:, None]
        keep = ~own
        keep[keep.sum(1) > k, -1] = False  # the row did not find itself: drop the farthest instead
        indices, scores = indices[keep].reshape(len(query), k), scores[keep].reshape(len(query), k)
    return torch.from_numpy(indices).long(), torch.from_numpy(scores)


def kmeans(features: Tensor | np.ndarray, k: int, seed: int = 0, n_init: int = 10, iterations: int = 100
           ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """k-means (best of `n_init` runs by inertia). Returns (assignments N, centroids k x D)."""
    x = _as_faiss(features)
    model = faiss.Kmeans(x.shape[1], k, niter=iterations, nredo=n_init, seed=seed, gpu=bool(faiss_gpus()),
                         max_points_per_centroid=max(256, len(x) // k + 1))  # fmt: skip
    model.train(x)
    _, assignments = model.index.search(x, 1)
    return torch.from_numpy(assignments[:, 0]).long(), torch.from_numpy(model.centroids.copy())


def neighbor_agreement(neighbors: Tensor, labels: Tensor) -> float | None:
    """Label agreement of neighbours (SCAN's diagnostic of mined neighbours): the fraction of
    (sample, neighbour) pairs in `neighbors` (N x k indices into `labels`) whose labels are equal,
    over the samples that have a label (>= 0). None when no sample has one. Reports only."""
    labels = labels.cpu()
    labelled = labels >= 0
    if not labelled.any():
        return None
    same = labels[neighbors.cpu()] == labels[:, None]
    return float(same[labelled].float().mean())
