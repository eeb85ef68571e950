"""clusterlab: deep image clustering (CC, NNM, SCL, DCCM) on PyTorch Lightning."""

__version__ = "0.1.0"
