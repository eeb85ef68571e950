"""Nearest neighbours and k-means on feature matrices, through faiss.

The one place that searches neighbours (NNM's mining and global neighbours, diagnostics) or runs
k-means (the k-means baseline, CC's "ICH only" ablation). A GPU index is used when the installed
faiss has GPU support and a GPU is visible: on this process's device only, with faiss's GPU
resources made once per process and device; otherwise the CPU one.
"""

from __future__ import annotations

import os

import faiss
import numpy as np
import torch
from torch import Tensor

# The share of the device's free memory the torch search takes when knn gets no memory_budget:
# the rest is left to whatever else the process (a training step, faiss, the data) holds.
MEMORY_FRACTION = 0.25
# Bytes per (query, base row) pair of a block: the float32 score and topk's workspace, taken at its
# worst case (a sort's (value, int64 index) pair per score).
_BYTES_PER_PAIR = 4 + 16


def _as_faiss(x: Tensor | np.ndarray) -> np.ndarray:
    x = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)


def faiss_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


_GPU_RESOURCES: dict[int, object] = {}  # device -> faiss.StandardGpuResources, made once per process


def _on_this_gpu(index):
    """`index` on this process's GPU (a DDP rank's own, not every GPU of the node). faiss allocates
    outside torch's cache, so its resources (temporary memory, streams) are made once per device
    and kept, not once per call."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    if device not in _GPU_RESOURCES:
        _GPU_RESOURCES[device] = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[device], device, index)


def free_memory(device: torch.device) -> int:
    """Bytes still free on `device`: on CUDA the driver's free memory plus what torch's cache holds
    unused; otherwise the host's MemAvailable (/proc/meminfo; os.sysconf where there is none)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def query_block(num_base: int, budget: int, num_queries: int) -> int:
    """Queries per block of the torch search: the most whose scores against `num_base` rows and
    topk's workspace (`_BYTES_PER_PAIR` bytes per pair) fit in `budget` bytes; 1 to num_queries."""
    return max(1, min(num_queries, budget // (_BYTES_PER_PAIR * num_base)))


def search_block(
    num_base: int, num_queries: int, dim: int, k: int, device: torch.device, memory_budget: int | None = None
) -> int:
    """The query block of `knn`'s torch search (its docstring has the rule)."""
    if memory_budget is None and _BYTES_PER_PAIR * num_base * num_queries <= 64 << 20:
        return num_queries  # small (NNM's local neighbours, every step): one block, no need to ask the device
    budget = int(MEMORY_FRACTION * free_memory(device)) if memory_budget is None else memory_budget
    fixed = 4 * (num_base + num_queries) * dim + 12 * num_queries * k  # float32 copies, the result
    return query_block(num_base, budget - fixed, num_queries)


def knn(
    features: Tensor | np.ndarray,
    k: int,
    queries: Tensor | np.ndarray | None = None,
    metric: str = "cosine",
    exclude_self: bool = True,
    backend: str = "auto",
    memory_budget: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The k nearest rows of `features` for each query (default: each row of `features`).

    metric: "cosine" (rows L2-normalised, inner product) or "l2" (squared distances). With
    queries = features and exclude_self, a row is not its own neighbour. Returns (indices,
    similarities-or-distances), both N x k, nearest first, on the device of `features`.
    backend: "faiss", "torch" (blocked matrix products on the features' device), or "auto":
    faiss, unless the features are on a GPU that faiss cannot use, where a round trip through the
    host would cost more than the search.

    Memory of the torch backend, N base rows and Q queries of D dimensions: at most
    4(N + Q)D (float32 copies) + 12Qk (the result) + 20bN bytes (a block of b queries: 4 for each
    score, 16 for topk's workspace), b the most that keeps the sum within `memory_budget` bytes
    (default: MEMORY_FRACTION of the device's free memory, `free_memory`; a search whose blocks
    would total 64 MiB at most is one block), at least 1. The faiss backend holds float32 copies
    and searches in fixed tiles of its own (memory_budget unused).
    """
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric must be 'cosine' or 'l2', not {metric!r}")
    device = features.device if isinstance(features, Tensor) else torch.device("cpu")
    if backend == "auto":
        backend = "torch" if device.type != "cpu" and not faiss_gpus() else "faiss"
    skip = int(exclude_self and queries is None)
    if backend == "torch":  # each row's own score masked before the top-k: fixed shapes, no host wait
        indices, scores = _torch_search(
            features, features if queries is None else queries, k, metric, skip, memory_budget
        )
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
        index = _on_this_gpu(index)
    index.add(base)
    scores, indices = index.search(query, k)
    return torch.from_numpy(indices).long(), torch.from_numpy(scores)


@torch.no_grad()
def _torch_search(
    features,
    queries,
    k: int,
    metric: str,
    exclude_self: bool = False,
    memory_budget: int | None = None,
    block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Blocked matrix products, `block` queries at a time (default: sized by `knn`'s memory rule);
    with `exclude_self` (queries are the features), row i's score against itself is set to the worst
    value before the top-k, so it is never among the k."""
    base = torch.as_tensor(features).float().flatten(1)
    query = torch.as_tensor(queries).float().flatten(1).to(base.device)
    n, q = len(base), len(query)
    block = block or search_block(n, q, base.shape[1], k, base.device, memory_budget)
    if metric == "cosine":
        base, query = torch.nn.functional.normalize(base, dim=1), torch.nn.functional.normalize(query, dim=1)
    base_norms = None
    if metric != "cosine":  # |q - b|^2 = |q|^2 - 2 q.b + |b|^2, as faiss: no per-block copy of the base
        base_norms = base.square().sum(1)
    # Written in place, block by block: no list of parts and no second copy to concatenate them.
    indices = torch.empty(q, k, dtype=torch.long, device=base.device)
    scores = torch.empty(q, k, device=base.device)
    for start in range(0, q, block):
        rows = query[start : start + block]
        out = (scores[start : start + block], indices[start : start + block])
        # float32 scores under a caller's autocast too (NNM searches inside its bf16 training step)
        with torch.autocast(base.device.type, enabled=False):
            _score_block(rows, base, start, k, metric, exclude_self, out, base_norms)
    return indices, scores


def _score_block(rows, base, start, k, metric, exclude_self, out, base_norms) -> None:
    """The top-k of one block of queries against the base, into `out` (scores, indices). Its score
    matrix is freed on return, before the next block's is made: never two alive at once."""
    if metric == "cosine":
        block_scores = rows @ base.T
        if exclude_self:
            block_scores.diagonal(offset=start).fill_(-torch.inf)
        torch.topk(block_scores, k, dim=1, out=out)
    else:
        block_scores = torch.addmm(base_norms, rows, base.T, alpha=-2)
        block_scores.add_(rows.square().sum(1, keepdim=True)).clamp_min_(0)
        if exclude_self:
            block_scores.diagonal(offset=start).fill_(torch.inf)
        torch.topk(block_scores, k, dim=1, largest=False, out=out)


def kmeans(
    features: Tensor | np.ndarray,
    k: int,
    seed: int = 0,
    n_init: int = 10,
    iterations: int = 100,
    max_points: int = 100_000,
) -> tuple[Tensor, Tensor]:
    """k-means (best of `n_init` runs by inertia). Returns (assignments N, centroids k x D).

    With more than `max_points` rows the centroids are trained on `max_points` of them, drawn
    without replacement by numpy's default_rng(seed) (sorted), and then every row is assigned to its
    nearest centroid; with at most `max_points` rows every row trains.
    """
    x = _as_faiss(features)
    train = x
    if len(x) > max_points:  # k-means' cost grows with the rows; its centres need far fewer
        train = x[np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))]
    model = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iterations,
        nredo=n_init,
        seed=seed,
        max_points_per_centroid=max(256, len(train) // k + 1),  # faiss must not subsample again
        min_points_per_centroid=1,  # over-clustering a few thousand points is intended: no warning
    )
    if faiss_gpus():  # faiss.Kmeans(gpu=...) would take every GPU of the node: this process's only
        model.index = _on_this_gpu(model.index)
    model.train(train)
    _, assignments = model.index.search(x, 1)  # the index holds the trained centroids
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
