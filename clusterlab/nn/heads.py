"""Heads on top of a backbone's features."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear - ReLU - Linear: the two-layer MLP of SimCLR and CC's g_I and g_C."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class ClusterHeads(nn.Module):
    """`num_heads` independent cluster heads, each feature -> C logits.

    hidden_dim=None: one linear layer per head (SCAN / NNM); an int: Linear - ReLU - Linear (CC's g_C).
    The output stacks the heads: num_heads x B x C logits.
    """

    def __init__(self, in_dim: int, num_clusters: int, num_heads: int = 1, hidden_dim: int | None = None) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Linear(in_dim, num_clusters) if hidden_dim is None else mlp(in_dim, hidden_dim, num_clusters)
            for _ in range(num_heads)
        )

    def forward(self, features: Tensor) -> Tensor:
        return torch.stack([head(features) for head in self.heads])
