from clusterlab.nn.backbones import ResNet, SmallCNN
from clusterlab.nn.heads import ClusterHeads, mlp

__all__ = ["ClusterHeads", "ResNet", "SmallCNN", "mlp"]
