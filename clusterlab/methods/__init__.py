"""Clustering methods, one per file, on the shared base class."""

from clusterlab.methods.base import ClusteringMethod
from clusterlab.methods.cc import CC
from clusterlab.methods.dccm import DCCM
from clusterlab.methods.nnm import NNM
from clusterlab.methods.scl import SCL
from clusterlab.methods.simclr import SimCLR
from clusterlab.methods.temi import TEMI

# The names `clusterlab cluster FOLDER --method NAME` accepts (any ClusteringMethod with a
# folder_recipe is accepted by class path too).
FOLDER_METHODS = {
    "cc": "clusterlab.methods.CC",
    "nnm": "clusterlab.methods.NNM",
    "scl": "clusterlab.methods.SCL",
    "dccm": "clusterlab.methods.DCCM",
    "temi": "clusterlab.methods.TEMI",
}

__all__ = ["CC", "DCCM", "FOLDER_METHODS", "NNM", "SCL", "TEMI", "ClusteringMethod", "SimCLR"]
