"""Clustering methods, one per file, on the shared base class."""

from clusterlab.methods.base import ClusteringMethod
from clusterlab.methods.cc import CC
from clusterlab.methods.scl import SCL

__all__ = ["CC", "SCL", "ClusteringMethod"]
