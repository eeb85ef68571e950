"""Callbacks: stateful, scheduled work of the methods (after an optimizer step, at an epoch
boundary). Each declares what it needs from a method as a Protocol next to itself and checks it
in `setup`. Their state lives on the method (buffers and submodules) or in the callback's
`state_dict`, so it is in every checkpoint and a resumed run continues from it."""

from clusterlab.callbacks.global_neighbors import GlobalNeighbors, HasFeaturesAndLogits
from clusterlab.callbacks.momentum import HasMomentumEncoder, MomentumEncoder
from clusterlab.callbacks.scl import PseudoLabelled, PseudoLabelRefresh

__all__ = [
    "GlobalNeighbors",
    "HasFeaturesAndLogits",
    "HasMomentumEncoder",
    "MomentumEncoder",
    "PseudoLabelRefresh",
    "PseudoLabelled",
]
