from clusterlab.nn.backbones import DCCMNet, ResNet, SmallCNN
from clusterlab.nn.heads import ClusterHeads, LocalDiscriminator, mlp

__all__ = ["ClusterHeads", "DCCMNet", "LocalDiscriminator", "ResNet", "SmallCNN", "mlp"]
