"""Callbacks: stateful work on a schedule, with their state in the checkpoint."""

from clusterlab.callbacks.global_neighbors import GlobalNeighbors

__all__ = ["GlobalNeighbors"]
