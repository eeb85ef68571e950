"""Clustering methods, one per file, on the shared base class."""

from clusterlab.methods.base import ClusteringMethod
from clusterlab.methods.cc import CC
from clusterlab.methods.dccm import DCCM
from clusterlab.methods.nnm import NNM
from clusterlab.methods.scl import SCL
from clusterlab.methods.simclr import SimCLR

__all__ = ["CC", "DCCM", "NNM", "SCL", "ClusteringMethod", "SimCLR"]
