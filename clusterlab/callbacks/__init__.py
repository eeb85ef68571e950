"""Callbacks: stateful, scheduled work of the methods (after an optimizer step, at an epoch
boundary). Their state lives on the method (buffers and submodules) or in the callback's
`state_dict`, so it is in every checkpoint and a resumed run continues from it."""

from clusterlab.callbacks.global_neighbors import GlobalNeighbors
from clusterlab.callbacks.momentum import MomentumEncoder
from clusterlab.callbacks.scl import PseudoLabelRefresh, SemanticMemoryUpdate

__all__ = ["GlobalNeighbors", "MomentumEncoder", "PseudoLabelRefresh", "SemanticMemoryUpdate"]
