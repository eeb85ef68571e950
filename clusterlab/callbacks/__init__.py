"""Stateful, scheduled work of the methods: what happens after an optimizer step or at an epoch
boundary. The state they update lives on the method (buffers and submodules), so it is in every
checkpoint and a resumed run continues from it."""

from clusterlab.callbacks.momentum import MomentumEncoder
from clusterlab.callbacks.scl import PseudoLabelRefresh, SemanticMemoryUpdate

__all__ = ["MomentumEncoder", "PseudoLabelRefresh", "SemanticMemoryUpdate"]
