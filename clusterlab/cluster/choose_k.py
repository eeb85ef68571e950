"""How many clusters: chosen from the learned features alone (no label, no held-out score).

METHOD: the eigengap of the kNN graph (spectral clustering's rule; von Luxburg, "A tutorial on
spectral clustering", 2007, Sec. 8.3). The contrastive features put images of one kind close
together. Link every image to its nearest neighbours (cosine, faiss: clusterlab.neighbors.knn)
and take the normalised Laplacian L = I - D^-1/2 W D^-1/2 of that graph: a graph of K groups
with few links between them has K eigenvalues near 0 and then a jump. K is where the jump
lambda_{K+1} - lambda_K is largest, over K = 2..K_max. The curve shown in report.html is that
jump for every K.

Details that keep it stable: the graph is the symmetrised kNN graph with k = N / 5 neighbours,
at least 10 and at most 50. k must be a fair share of a group: with too few neighbours a group of
images breaks into sub-groups (pose, contrast, exposure) that the graph sees as separate. On the
SimCLR features of the 120-image test folder of 4 kinds (tests/cluster/test_command.py), k = 10 / 15 gave
K = 12 / 8 and k = 20..30 gave 4; on a 2,000-image folder of the 10 digits, k = 10..40 gave 11-12.
At most 5,000 images are used, drawn with the seed (the eigen-solver's
time grows with the graph; the gaps do not need more). Ties go to the smaller K.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

METHOD = "eigengap of the kNN-graph Laplacian of the SimCLR features"
CAPTION = (
    "How K was chosen: the eigengap lambda(K+1) - lambda(K) of the normalised Laplacian of the "
    "images' nearest-neighbour graph (features of the first training phase, no label). K groups "
    "with few links between them give K eigenvalues near 0, then a jump; the largest jump wins."
)
MAX_POINTS = 5000


def neighbors_for(n: int) -> int:
    return int(min(50, max(10, round(n / 5))))


@dataclass
class Choice:
    k: int
    method: str
    curve: dict  # k, value, chosen, label, title: for the report's figure and cluster.json


def laplacian_spectrum(features: torch.Tensor, count: int, neighbors: int) -> np.ndarray:
    """The `count` smallest eigenvalues of the normalised Laplacian of the symmetrised kNN graph."""
    import scipy.sparse as sparse
    from scipy.linalg import eigh
    from scipy.sparse.linalg import eigsh

    from clusterlab.neighbors import knn

    n = len(features)
    neighbors = max(1, min(neighbors, n - 1))
    indices, _ = knn(features, neighbors, metric="cosine")
    rows = np.repeat(np.arange(n), neighbors)
    graph = sparse.csr_matrix((np.ones(n * neighbors), (rows, indices.cpu().numpy().ravel())), shape=(n, n))
    graph = ((graph + graph.T) > 0).astype(np.float64)
    scale = sparse.diags(1.0 / np.sqrt(np.asarray(graph.sum(1)).ravel()))
    laplacian = sparse.eye(n) - scale @ graph @ scale
    count = min(count, n)
    if n <= 1000:  # dense is exact and fast
        return np.sort(eigh(laplacian.toarray(), eigvals_only=True))[:count]
    # The smallest eigenvalues of L are the largest of 2I - L (spectrum in [0, 2]): Lanczos
    # converges on those fast, without a factorisation.
    values = eigsh(
        2.0 * sparse.eye(n) - laplacian, k=count, which="LA", tol=1e-6, v0=np.ones(n) / np.sqrt(n)
    )[0]
    return np.sort(2.0 - values)


def choose(features: torch.Tensor, candidates: range, seed: int = 0) -> Choice:
    """K over `candidates` (2..K_max) by the largest eigengap; see the module docstring."""
    ks = [k for k in candidates if k >= 2]
    if not ks:
        raise ValueError("no K to choose from")
    features = features.float()
    if len(features) > MAX_POINTS:
        pick = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:MAX_POINTS]
        features = features[pick]
    neighbors = neighbors_for(len(features))
    spectrum = laplacian_spectrum(features, max(ks) + 1, neighbors)
    gaps = [float(spectrum[k] - spectrum[k - 1]) if k < len(spectrum) else 0.0 for k in ks]
    k = ks[int(np.argmax(gaps))]  # argmax takes the first of equal gaps: the smaller K
    curve = {
        "k": ks,
        "value": gaps,
        "chosen": k,
        "label": "eigengap  lambda(K+1) - lambda(K)",
        "title": f"choosing K: the largest eigengap of the {neighbors}-NN graph",
        "eigenvalues": spectrum.tolist(),
        "neighbors": neighbors,
    }
    return Choice(k, METHOD, curve)
