"""Backbones and the shallow feature map each one names."""

import pytest
import torch

from clusterlab.nn import DCCMNet, ResNet, SmallCNN


def test_dccm_net_is_the_authors_cifar_net_with_m_after_the_first_pool():
    net = DCCMNet(in_channels=3).eval()
    x = torch.rand(2, 3, 32, 32)
    features, shallow = net(x, with_shallow=True)
    assert features.shape == (2, 64) and shallow.shape == (2, 64, 14, 14)  # the authors' M: 64 x 14 x 14
    assert torch.equal(features, net(x))
    assert net.shallow_dim == 64 and net.out_dim == 64


def test_dccm_net_takes_8x8_grey_digits_when_padded_and_says_why_when_not():
    features, shallow = DCCMNet(in_channels=1, padding=1)(torch.rand(4, 1, 8, 8), with_shallow=True)
    assert features.shape == (4, 64) and shallow.shape == (4, 64, 4, 4)
    with pytest.raises(ValueError, match="needs images of at least 20 px; got \\(8, 8\\): use padding: 1"):
        DCCMNet(in_channels=1)(torch.rand(4, 1, 8, 8))
    assert DCCMNet(in_channels=1)(torch.rand(2, 1, 28, 28), with_shallow=True)[1].shape == (2, 64, 12, 12)


@pytest.mark.parametrize(
    "backbone,size,shape",
    [
        (SmallCNN(1, (8, 16, 32), (False, True, False)), 8, (16, 4, 4)),  # default: after the first pool
        (SmallCNN(1, (8, 16, 32), (False, True, False), shallow_block=0), 8, (8, 8, 8)),
        (ResNet(18, "cifar"), 32, (128, 16, 16)),  # default: layer2
        (ResNet(18, "cifar", shallow="layer1"), 32, (64, 32, 32)),
    ],
)
def test_shared_backbones_name_their_shallow_map(backbone, size, shape):
    backbone.eval()
    x = torch.rand(2, backbone.net[0].in_channels if isinstance(backbone, SmallCNN) else 3, size, size)
    features, shallow = backbone(x, with_shallow=True)
    assert shallow.shape[1:] == shape and backbone.shallow_dim == shape[0]
    torch.testing.assert_close(features, backbone(x))
