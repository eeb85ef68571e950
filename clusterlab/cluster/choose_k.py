"""How many clusters: chosen from the learned features alone (no label, no held-out score).

METHOD: over-cluster, then merge, and keep the K at which the kNN graph is best divided (the
modularity of Newman & Girvan 2004, the criterion of community detection; the merging is the
greedy agglomeration of Clauset, Newman & Moore 2004).

1. Link every image to its nearest neighbours in the contrastive features (cosine, faiss:
   clusterlab.neighbors.knn), symmetrised: images of one kind are linked mostly to each other.
2. Over-cluster: k-means into C = 3 x K_max groups, far more than any K considered.
3. Merge, again and again, the two groups whose union raises the modularity most,
       Q = sum_c (e_cc - a_c^2)
   (e_cc: the share of the graph's links inside group c; a_c: the share of link ends in c; the
   gain of merging c and d is 2 (e_cd - a_c a_d)), recording Q at every K down to 2.
4. Steps 2-3 are repeated from 5 k-means seeds and Q(K) averaged: a single over-clustering
   moves the argmax of a flat curve. The curve in report.html is that mean Q(K).
5. K = the smallest K whose mean Q is within one standard error of the best mean Q (the
   one-standard-error rule of model selection: Breiman et al. 1984, and the gap statistic's
   "smallest k such that Gap(k) >= Gap(k+1) - s"; the standard error is that of the best K's
   mean over the 5 over-clusterings). The top of the curve is flat, and its plain argmax can land
   on a K that splits a kind with two styles of writing it (a 0, a 2). Within the noise of the
   criterion, the fewer clusters win.

Why not the eigengap of the same graph: on contrastive features trained for minutes it counts
the sub-kinds that the features separate (sleeve lengths, shoe types), and it moves with the
neighbourhood size. Modularity weighs a split against the links it cuts relative to chance, and
on the same features it lands near the number of kinds on both folders of
benchmarks/make_folders.py; more neighbours link neighbouring kinds (shirts and coats) more.
(Figures: docs/results.md, "Measurements behind design choices"; docs/cluster-folder.md,
"How K is chosen".)

Details: k = N / 5 neighbours, at least 10 and at most 30 (a fair share of a group, so that a group
does not break into the sub-groups of pose or exposure, and not so many that neighbouring kinds
merge). At most 5,000 images are used, drawn with the seed (the graph and k-means do not need more
to count the groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clusterlab.errors import ConfigError

METHOD = (
    "modularity of the kNN graph of the features, over-clustered by k-means then merged; "
    "the fewest clusters within one standard error of the best"
)
CAPTION = (
    "How K was chosen: the images' nearest-neighbour graph (features of the first phase: SimCLR "
    "trained on the folder, or the pretrained network; no label) is over-clustered by k-means, then "
    "the two groups whose union raises the graph's modularity Q most are merged, again and again. "
    "Q(K) is the share of links inside the groups minus what chance would give, averaged over 5 "
    "over-clusterings; the smallest K whose Q is within one standard error of the largest wins "
    "(the dashed line)."
)
MAX_POINTS = 5000
OVER_CLUSTERING = 3  # C = 3 x K_max groups before merging
REPEATS = 5  # over-clusterings averaged


def neighbors_for(n: int) -> int:
    return int(min(30, max(10, round(n / 5))))


@dataclass
class Choice:
    k: int
    method: str
    curve: dict  # k, value, chosen, label, title: for the report's figure and cluster.json


def knn_graph(features: torch.Tensor, neighbors: int):
    """The symmetrised, unweighted kNN graph (scipy CSR; no self-links: knn leaves each row out)."""
    import scipy.sparse as sparse

    from clusterlab.neighbors import knn

    n = len(features)
    neighbors = max(1, min(neighbors, n - 1))
    indices, _ = knn(features, neighbors, metric="cosine")
    rows = np.repeat(np.arange(n), neighbors)
    graph = sparse.csr_matrix((np.ones(n * neighbors), (rows, indices.cpu().numpy().ravel())), shape=(n, n))
    return ((graph + graph.T) > 0).astype(np.float64)


def modularity_by_merging(graph, groups: np.ndarray) -> dict[int, float]:
    """Q(K) for every K from the number of `groups` down to 1, merging greedily (step 3)."""
    import scipy.sparse as sparse

    n, count = graph.shape[0], int(groups.max()) + 1
    member = sparse.csr_matrix((np.ones(n), (np.arange(n), groups)), shape=(n, count))
    links = (member.T @ graph @ member).toarray()
    links /= links.sum()  # e_cd, summing to 1 (both directions of each link)
    ends = links.sum(1)  # a_c
    alive = list(range(count))
    q = float(np.trace(links) - (ends**2).sum())
    curve = {count: q}
    while len(alive) > 1:
        gain = 2.0 * (links[np.ix_(alive, alive)] - np.outer(ends[alive], ends[alive]))
        np.fill_diagonal(gain, -np.inf)
        i, j = np.unravel_index(int(np.argmax(gain)), gain.shape)
        q += float(gain[i, j])
        c, d = alive[i], alive[j]
        links[c, :] += links[d, :]
        links[:, c] += links[:, d]
        ends[c] += ends[d]
        alive.remove(d)
        curve[len(alive)] = q
    return curve


def choose(features: torch.Tensor, candidates: range, seed: int = 0) -> Choice:
    """K over `candidates` (2..K_max): the fewest clusters whose modularity is within one standard
    error of the largest; see the module docstring."""
    from clusterlab.neighbors import kmeans

    ks = [k for k in candidates if k >= 2]
    if not ks:
        raise ValueError("no K to choose from")
    features = torch.nn.functional.normalize(features.float(), dim=1)
    if len(features) > MAX_POINTS:
        pick = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:MAX_POINTS]
        features = features[pick]
    n = len(features)
    neighbors = neighbors_for(n)
    graph = knn_graph(features, neighbors)
    over = min(OVER_CLUSTERING * max(ks), n)
    curves = []
    for repeat in range(REPEATS):
        groups, _ = kmeans(features, over, seed=seed * REPEATS + repeat, n_init=1)
        groups = np.unique(groups.numpy(), return_inverse=True)[1]  # no empty group
        curves.append(modularity_by_merging(graph, groups))
    ks = [k for k in ks if all(k in q for q in curves)]
    if not ks:
        # Some over-clustering found a single group: k-means put every feature in one place, so
        # the images are the same to the model (copies, or as near as the features can tell).
        # Any K would split alike images at random; say so instead of choosing one.
        found = min(max(q) for q in curves)  # a curve holds K = groups found .. 1
        raise ConfigError(
            f"the features of the {n} images do not tell them apart ({found} group"
            f"{'s' if found != 1 else ''} found, at least 2 needed): the images are the same or nearly "
            "so, and there is nothing to group. Give --num_clusters K to split them anyway."
        )
    table = np.array([[q[k] for k in ks] for q in curves])  # repeats x K
    values = table.mean(0)
    errors = table.std(0, ddof=1) / np.sqrt(len(curves))
    best = int(np.argmax(values))
    threshold = values[best] - errors[best]
    k = ks[int(np.argmax(values >= threshold))]  # the first, i.e. smallest, K within one error
    curve = {
        "k": ks,
        "value": [float(v) for v in values],
        "error": [float(e) for e in errors],
        "best": ks[best],
        "threshold": float(threshold),
        "chosen": k,
        "label": "modularity Q(K)",
        "title": f"choosing K: modularity of the {neighbors}-NN graph",
        "neighbors": neighbors,
        "over_clustering": over,
    }
    return Choice(k, METHOD, curve)
