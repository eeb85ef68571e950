from clusterlab.nn.backbones import DCCMNet, ResNet, SmallCNN
from clusterlab.nn.heads import ClusterHeads, KMeansHead, LocalDiscriminator, mlp

__all__ = ["ClusterHeads", "DCCMNet", "KMeansHead", "LocalDiscriminator", "ResNet", "SmallCNN", "mlp"]
