from clusterlab.nn.backbones import DCCMNet, Pretrained, ResNet, SmallCNN
from clusterlab.nn.heads import (
    ClusterHead,
    ClusterHeads,
    KMeansHead,
    LocalDiscriminator,
    ProjectionHeads,
    mlp,
)

__all__ = [
    "ClusterHead",
    "ClusterHeads",
    "DCCMNet",
    "KMeansHead",
    "LocalDiscriminator",
    "Pretrained",
    "ProjectionHeads",
    "ResNet",
    "SmallCNN",
    "mlp",
]
