"""Heads on top of a backbone's features."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clusterlab.distributed import broadcast, rank
from clusterlab.neighbors import kmeans
from clusterlab.seeding import run_seed


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear - ReLU - Linear: the two-layer MLP of SimCLR and CC's g_I and g_C."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class ClusterHeads(nn.Module):
    """`num_heads` independent cluster heads, each feature -> C logits.

    hidden_dim=None: one linear layer per head (SCAN / NNM); an int: Linear - ReLU - Linear (CC's g_C).
    The output stacks the heads: num_heads x B x C logits.
    """

    def __init__(
        self, in_dim: int, num_clusters: int, num_heads: int = 1, hidden_dim: int | None = None
    ) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Linear(in_dim, num_clusters) if hidden_dim is None else mlp(in_dim, hidden_dim, num_clusters)
            for _ in range(num_heads)
        )

    def forward(self, features: Tensor) -> Tensor:
        return torch.stack([head(features) for head in self.heads])


class KMeansHead(nn.Module):
    """Clusters as the k-means centres of some features: the cluster head of a method that trains
    none (SimCLR, CC's "ICH only", SCL without its target task), which composes one.

    `fit` runs k-means on features of the whole evaluation set (gathered to rank 0) on rank 0 and
    broadcasts the centres; the method calls it at every evaluation, on every process. The other
    ranks wait in the broadcast for as long as rank 0's k-means takes (kmeans' 100k-row training
    subsample bounds it; clusterlab.distributed.PROCESS_GROUP_TIMEOUT is the limit). The centres
    are a buffer, so they are in the checkpoint and prediction stays online: a sample's logits are
    minus its distances to the centres.
    """

    def __init__(self, num_clusters: int, feature_dim: int) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.register_buffer("centroids", torch.zeros(num_clusters, feature_dim))

    @torch.no_grad()
    def fit(self, features: Tensor | None, seed: int | None = None) -> None:
        """k-means of `features` on rank 0 (seed: the run's by default), centres broadcast; the other
        ranks' `features` are not read (None where they were gathered to rank 0 only)."""
        if rank() == 0:
            seed = run_seed() if seed is None else seed
            # Fewer samples than clusters (a smoke test's data): as many clusters as samples, repeated.
            centroids = kmeans(features, min(self.num_clusters, len(features)), seed=seed)[1].to(
                self.centroids
            )
            self.centroids.copy_(centroids[torch.arange(self.num_clusters) % len(centroids)])
        self.centroids.copy_(broadcast(self.centroids))

    def forward(self, features: Tensor) -> Tensor:
        """Logits (B x C): minus the distance to each centre."""
        return -torch.cdist(features.float(), self.centroids)


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
