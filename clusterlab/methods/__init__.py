"""Clustering methods, one per file, on the shared base class."""

from clusterlab.methods.base import ClusteringMethod
from clusterlab.methods.cc import CC
from clusterlab.methods.dccm import DCCM

__all__ = ["CC", "DCCM", "ClusteringMethod"]
