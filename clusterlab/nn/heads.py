"""Heads on top of a backbone's features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clusterlab.distributed import broadcast, rank
from clusterlab.neighbors import kmeans
from clusterlab.seeding import derive_seed, run_seed

_KMEANS_START_STREAM = 7  # derive_seed stream of the k-means start of cluster heads


def mlp(in_dim: int, hidden_dim: int, out_dim: int, activation: nn.Module | None = None) -> nn.Sequential:
    """Linear - activation - Linear: the two-layer MLP of SimCLR and CC's g_I and g_C (ReLU, the
    default), and of DINO's heads (GELU)."""
    activation = nn.ReLU(inplace=True) if activation is None else activation
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), activation, nn.Linear(hidden_dim, out_dim))


class ClusterHead(nn.Module):
    """What every method's `cluster_head` is, and what `ClusteringMethod` drives.

    - `forward(features)`: the logits of every head, num_heads x B x C, from the features the
      method gives it (`ClusteringMethod.cluster_features`);
    - `fitted`: False for a head trained by the method's loss; True for one fitted to the
      evaluation set's features instead (k-means), which the base class then fits at every
      evaluation through `fit(features)`, so that no method writes that evaluation itself;
    - `permute_(order)`: renumber the clusters in place, new cluster k being old cluster
      order[k], so that every use of the weights afterwards names the clusters the new way (the
      folder command orders clusters by size).
    """

    fitted = False

    def fit(self, features: Tensor | None, seed: int | None = None) -> None:
        """Fit the head to the evaluation set's `features` (rank 0's; None on the other ranks)."""
        raise NotImplementedError(f"{type(self).__name__} is trained, not fitted")

    def permute_(self, order: Tensor) -> None:
        """Renumber the clusters in place: cluster `order[j]` becomes cluster j. Every head says how."""
        raise NotImplementedError(f"{type(self).__name__} does not say how to renumber its clusters")


def permute_outputs_(layer: nn.Module, order: Tensor) -> None:
    """Output unit k of a Linear / BatchNorm1d becomes its old unit order[k]."""
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, Tensor) and tensor.ndim >= 1 and len(tensor) == len(order):
                tensor.copy_(tensor[order.to(tensor.device)])


class ClusterHeads(ClusterHead):
    """`num_heads` independent cluster heads, each feature -> C logits.

    hidden_dim=None: one linear layer per head (SCAN / NNM); an int: Linear - ReLU - Linear (CC's g_C).
    logit_norm: a BatchNorm1d on each head's logits, and no bias before it (DCCM's last layer; a
    bias before a BN would get no gradient but rounding noise). The output stacks the heads:
    num_heads x B x C logits.
    """

    def __init__(
        self,
        in_dim: int,
        num_clusters: int,
        num_heads: int = 1,
        hidden_dim: int | None = None,
        logit_norm: bool = False,
    ) -> None:
        super().__init__()
        if logit_norm and hidden_dim is not None:
            raise ValueError("ClusterHeads: logit_norm is for one-layer heads (hidden_dim=None)")

        def head() -> nn.Module:
            if logit_norm:
                return nn.Sequential(
                    nn.Linear(in_dim, num_clusters, bias=False), nn.BatchNorm1d(num_clusters)
                )
            if hidden_dim is None:
                return nn.Linear(in_dim, num_clusters)
            return mlp(in_dim, hidden_dim, num_clusters)

        self.heads = nn.ModuleList(head() for _ in range(num_heads))

    def forward(self, features: Tensor) -> Tensor:
        return torch.stack([head(features) for head in self.heads])

    def permute_(self, order: Tensor) -> None:
        """Every head's output layers (its last Linear and what follows it) move their units."""
        for head in self.heads:
            layers = list(head) if isinstance(head, nn.Sequential) else [head]
            last = max(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear))
            for layer in layers[last:]:
                permute_outputs_(layer, order)


class ProjectionHeads(ClusterHead):
    """`num_heads` DINO-style heads, each features -> C logits: Linear - GELU - Linear to a
    bottleneck, L2-normalised, then a weight-normalised linear layer without bias (each cluster a
    direction v_k with a length g_k: logits g_k <z, v_k / |v_k|>). TEMI's heads (its authors use
    DINO's head: "Emerging Properties in Self-Supervised Vision Transformers", Caron et al., ICCV
    2021, arXiv:2104.14294). Output: num_heads x B x C."""

    def __init__(
        self,
        in_dim: int,
        num_clusters: int,
        num_heads: int = 1,
        hidden_dim: int = 512,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()

        def head() -> nn.Sequential:  # DINO's initialisation: a normal of std 0.02 cut at 2 std, biases 0
            layers = mlp(in_dim, hidden_dim, bottleneck_dim, nn.GELU())
            for layer in (layers[0], layers[2]):
                nn.init.trunc_normal_(layer.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(layer.bias)
            return layers

        self.mlps = nn.ModuleList(head() for _ in range(num_heads))
        directions = torch.stack(
            [nn.Linear(bottleneck_dim, num_clusters).weight.detach() for _ in range(num_heads)]
        )
        self.directions = nn.Parameter(directions)  # v: heads x C x bottleneck
        self.lengths = nn.Parameter(torch.ones(num_heads, num_clusters, 1))  # g: heads x C x 1

    def forward(self, features: Tensor) -> Tensor:
        weights = self.lengths * nn.functional.normalize(self.directions, dim=-1)
        z = torch.stack([nn.functional.normalize(head(features), dim=-1) for head in self.mlps])
        return z @ weights.transpose(1, 2)

    def permute_(self, order: Tensor) -> None:
        with torch.no_grad():
            for tensor in (self.directions, self.lengths):
                tensor.copy_(tensor[:, order.to(tensor.device)])


class KMeansHead(ClusterHead):
    """Clusters as the k-means centres of some features: the cluster head of a method that trains
    none (SimCLR, CC's "ICH only", SCL without its target task).

    `fit` runs k-means on features of the whole evaluation set (gathered to rank 0) on rank 0 and
    broadcasts the centres; the base class calls it at every evaluation, on every process. The other
    ranks wait in the broadcast for as long as rank 0's k-means takes (kmeans' 100k-row training
    subsample bounds it; clusterlab.distributed.PROCESS_GROUP_TIMEOUT is the limit). The centres
    are a buffer, so they are in the checkpoint and prediction stays online: a sample's logits are
    minus its distances to the centres.
    """

    fitted = True

    def __init__(self, num_clusters: int, feature_dim: int) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.register_buffer("centroids", torch.zeros(num_clusters, feature_dim))

    @torch.no_grad()
    def fit(self, features: Tensor | None, seed: int | None = None, restarts: int = 10) -> None:
        """k-means of `features` on rank 0 (seed: the run's by default; the best of `restarts` runs),
        centres broadcast; the other ranks' `features` are not read (None where they were gathered to
        rank 0 only)."""
        if rank() == 0:
            seed = run_seed() if seed is None else seed
            # Fewer samples than clusters (a smoke test's data): as many clusters as samples, repeated.
            k = min(self.num_clusters, len(features))
            centroids = kmeans(features, k, seed=seed, n_init=restarts)[1].to(self.centroids)
            self.centroids.copy_(centroids[torch.arange(self.num_clusters) % len(centroids)])
        self.centroids.copy_(broadcast(self.centroids))

    def forward(self, features: Tensor) -> Tensor:
        """Logits (1 x B x C): minus the distance to each centre."""
        return -torch.cdist(features.float(), self.centroids)[None]

    def permute_(self, order: Tensor) -> None:
        with torch.no_grad():
            self.centroids.copy_(self.centroids[order.to(self.centroids.device)])


@torch.no_grad()
def kmeans_start(
    features: Tensor | None,
    dim: int,
    num_clusters: int,
    num_heads: int,
    temperature: float,
    device: torch.device | str,
    restarts: int = 10,
) -> list[Tensor]:
    """Per head, the C x D matrix M = c / (T |f|_median) of a spherical k-means of `features` (N x D,
    D = `dim`, rank 0's; None on the other ranks): the centres c_k (unit length) of k-means on the
    L2-normalised features, each head with its own seed (derive_seed(h, 7)). A head whose logits
    are M f gives cos(f, c_k) |f| / (T |f|_median): k-means' spherical assignment as its argmax, at
    a softmax temperature T. Rank 0 clusters; every rank returns the same matrices (the scale and
    the centres are broadcast). How CC and NNM start their cluster heads from the features they
    read. Each head's k-means keeps the best of `restarts` runs: with many the heads start alike
    (all near the one best partition), with 1 each starts in its own local optimum."""
    scale, directions = torch.zeros((), device=device), None
    if features is not None:
        scale = 1.0 / (temperature * features.norm(dim=1).median())
        directions = F.normalize(features, dim=1)  # once, for every head's k-means
    scale = broadcast(scale)
    spherical = KMeansHead(num_clusters, dim).to(device)
    starts = []
    for h in range(num_heads):
        seed = derive_seed(h, _KMEANS_START_STREAM) % 2**31  # each head its own k-means run
        spherical.fit(directions, seed=seed, restarts=restarts)
        starts.append(scale * F.normalize(spherical.centroids, dim=1))
    return starts


class LocalDiscriminator(nn.Module):
    """T(d, s) of Deep InfoMax's local objective, which DCCM's triplet mutual information uses.

    Scores a deep vector d against every position of a shallow feature map s: the input is
    [d tiled over s's grid; s], and three 1x1 convolutions map it to one score per position:
    Conv1x1(-> hidden) - ReLU - Conv1x1(hidden -> hidden) - ReLU - Conv1x1(hidden -> 1).

    Args:
        deep_dim: channels of d; shallow_dim: channels of s.
        hidden_dim: width of the two hidden 1x1 convolutions (512 in Deep InfoMax and DCCM).
    """

    def __init__(self, deep_dim: int, shallow_dim: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(deep_dim + shallow_dim, hidden_dim, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, hidden_dim, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, 1, 1),
        )

    def forward(self, deep: Tensor, shallow: Tensor) -> Tensor:
        """Scores of the pairs (deep[p], shallow[p]): P x D and P x c x h x w -> P x h x w."""
        tiled = deep[:, :, None, None].expand(-1, -1, *shallow.shape[-2:])
        return self.net(torch.cat([tiled, shallow], 1)).squeeze(1)
