"""Clustering methods, one per file, on the shared base class."""

from clusterlab.methods.base import ClusteringMethod
from clusterlab.methods.cc import CC

__all__ = ["CC", "ClusteringMethod"]
