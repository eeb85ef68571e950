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


def knn(
    features: Tensor | np.ndarray,
    k: int,
    queries: Tensor | np.ndarray | None = None,
    metric: str = "cosine",
    exclude_self: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The k nearest rows of `features` for each query (default: each row of `features`).

    metric: "cosine" (rows L2-normalised, inner product) or "l2" (squared distances). With
    queries = features and exclude_self, a row is not its own neighbour. Returns (indices,
    similarities-or-distances), both N x k, nearest first, on the device of `features`.
    backend: "faiss", "torch" (blocked matrix products on the features' device), or "auto":
    faiss, unless the features are on a GPU that faiss cannot use, where a round trip through the
    host would cost more than the search.
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', not {metric!r}")
    device = features.device if isinstance(features, Tensor) else torch.device("cpu")
    if backend == "auto":
        backend = "torch" if device.type != "cpu" and not faiss_gpus() else "faiss"
    skip = int(exclude_self and queries is None)
    if backend == "torch":  # each row's own score masked before the top-k: fixed shapes, no host wait
        indices, scores = _torch_search(features, features if queries is None else queries, k, metric, skip)
        return indices.to(device), scores.to(device)
    indices, scores = _faiss_search(features, features if queries is None else queries, k + skip, metric)
    if skip:  # drop each row itself (wherever ties put it), keep k others
        keep = indices != torch.arange(len(indices), device=indices.device)[:, None]
        keep[keep.sum(1) > k, -1] = False  # the row did not find itself: drop the farthest instead
        indices, scores = indices[keep].reshape(len(keep), k), scores[keep].reshape(len(keep), k)
    return indices.to(device), scores.to(device)


def _faiss_search(features, queries, k: int, metric: str) -> tuple[Tensor, Tensor]:
    base, query = _as_faiss(features), _as_faiss(queries)
    if metric == "cosine":
        base = base / np.maximum(np.linalg.norm(base, axis=1, keepdims=True), 1e-12)
        query = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(base.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(base.shape[1])
    if faiss_gpus():
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(base)
    scores, indices = index.search(query, k)
    return torch.from_numpy(indices).long(), torch.from_numpy(scores)


@torch.no_grad()
def _torch_search(
    features, queries, k: int, metric: str, exclude_self: bool = False, block: int = 4096
) -> tuple[Tensor, Tensor]:
    """Blocked matrix products; with `exclude_self` (queries are the features), row i's score
    against itself is set to the worst value before the top-k, so it is never among the k."""
    base = torch.as_tensor(features).float().flatten(1)
    query = torch.as_tensor(queries).float().flatten(1).to(base.device)
    if metric == "cosine":
        base, query = torch.nn.functional.normalize(base, dim=1), torch.nn.functional.normalize(query, dim=1)
    indices, scores = [], []
    for start, rows in zip(range(0, len(query), block), query.split(block)):
        if metric == "cosine":
            similarity = rows @ base.T
            if exclude_self:
                similarity.diagonal(offset=start).fill_(-torch.inf)
            best = similarity.topk(k, dim=1)
            scores.append(best.values)
        else:
            distance = torch.cdist(rows, base)
            if exclude_self:
                distance.diagonal(offset=start).fill_(torch.inf)
            best = distance.topk(k, dim=1, largest=False)
            scores.append(best.values.square())
        indices.append(best.indices)
    return torch.cat(indices), torch.cat(scores)


def kmeans(
    features: Tensor | np.ndarray, k: int, seed: int = 0, n_init: int = 10, iterations: int = 100
) -> tuple[Tensor, Tensor]:
    """k-means (best of `n_init` runs by inertia). Returns (assignments N, centroids k x D)."""
    x = _as_faiss(features)
    model = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        nredo=n_init,
        seed=seed,
        gpu=bool(faiss_gpus()),
        max_points_per_centroid=max(256, len(x) // k + 1),
        min_points_per_centroid=1,  # over-clustering a few thousand points is intended: no warning
    )
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
