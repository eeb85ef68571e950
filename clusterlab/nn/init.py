"""Weights drawn afresh: what a restart of a method (a new start from random weights) does to its
modules. One helper, for DCCM's restarts side by side and every method's restarts one after another
(`ClusteringMethod`'s `restarts`)."""

from __future__ import annotations

from torch import nn


def redraw_(module: nn.Module) -> nn.Module:
    """Draws every layer's parameters (and resets its running statistics) afresh, in place, from
    torch's global generator, as the layers' constructors did; returns the module."""
    for layer in module.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return module
