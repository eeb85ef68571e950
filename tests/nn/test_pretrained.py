"""Pretrained backbones: torchvision's networks with weights from a local file, frozen or not."""

from pathlib import Path

import pytest
import torch
import torchvision

from clusterlab.cli import main
from clusterlab.nn import Pretrained
from clusterlab.nn.backbones import WeightsNotFoundError
from tests.helpers import tiny_config, user_error


def pretrained_config(weights: str | None, **init_args) -> str:
    """CC on digits over a frozen torchvision ResNet-18 at 32 px (a test's size, not the weights')."""
    backbone = {"name": "resnet18", "image_size": 32, **init_args}
    if weights is not None:
        backbone["weights"] = weights
    return tiny_config(
        "CC",
        model={"backbone": {"class_path": "clusterlab.nn.Pretrained", "init_args": backbone}},
        trainer={"max_epochs": 1, "limit_train_batches": 2},
    )


def test_a_torchvision_backbone_loads_its_weights_file_through_the_cli_and_stays_frozen(in_tmp):
    torch.manual_seed(0)
    saved = torchvision.models.resnet18().state_dict()  # random weights, with the classifier's rows
    torch.save(saved, in_tmp / "resnet18.pth")
    (in_tmp / "tiny.yaml").write_text(pretrained_config("resnet18.pth"))
    main(["fit", "--config", "tiny.yaml"])
    [run_dir] = (in_tmp / "runs" / "tiny").iterdir()
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    backbone = {
        k.removeprefix("backbone.net."): v for k, v in trained.items() if k.startswith("backbone.net.")
    }
    assert set(backbone) == set(saved) - {"fc.weight", "fc.bias"}  # the classifier is dropped
    for key, value in backbone.items():  # frozen: two steps of training left every weight as loaded
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)


def test_without_weights_one_line_says_what_to_download_and_where_to_put_it(in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "torch-home"))  # an empty cache
    (in_tmp / "tiny.yaml").write_text(pretrained_config(None))
    line = user_error(capsys, "fit", "--config", "tiny.yaml")
    cached = in_tmp / "torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert "download https://download.pytorch.org/models/resnet18-f37072fd.pth" in line
    assert f"put it at {cached}" in line


def test_torchvisions_cache_is_used_when_no_file_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    saved = torchvision.models.resnet18().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(saved, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    net = Pretrained("resnet18")
    torch.testing.assert_close(net.net.conv1.weight, saved["conv1.weight"])


def plain_resnet18_features(weights: Path, x: torch.Tensor, size: int) -> torch.Tensor:
    """What a torchvision ResNet-18 with `weights` gives before its classifier, NCHW in float32, for
    `x` (3 channels, in [0, 1]) resized to `size` and normalised by ImageNet's mean and std."""
    reference = torchvision.models.resnet18().eval()
    reference.load_state_dict(torch.load(weights, weights_only=True))
    reference.fc = torch.nn.Identity()
    x = torch.nn.functional.interpolate(
        x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    with torch.no_grad():
        return reference((x - mean) / std)


def test_features_are_the_networks_before_its_classifier_on_normalised_resized_input():
    torch.manual_seed(0)
    path = Path(__import__("tempfile").mkdtemp()) / "w.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    net = Pretrained("resnet18", weights=str(path), in_channels=1, image_size=64).train()
    assert net.out_dim == 512 and not net.net.training  # frozen: eval mode whatever the module's
    grey = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(net(grey), plain_resnet18_features(path, grey.expand(-1, 3, -1, -1), 64))


def test_fine_tuning_trains_the_weights_and_a_bad_file_is_named(tmp_path):
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "m.pth")
    net = Pretrained("mobilenet_v3_small", weights=str(tmp_path / "m.pth"), frozen=False).train()
    assert net.net.training and all(p.requires_grad for p in net.parameters())
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    assert net.net.features[0][0].weight.grad is not None
    (tmp_path / "bad.pth").write_bytes(b"not a state dict")
    with pytest.raises(WeightsNotFoundError, match=r"cannot read .*bad\.pth"):
        Pretrained("resnet18", weights=str(tmp_path / "bad.pth"))


def test_what_changes_the_features_changes_the_cache_key_and_bf16_stays_close_to_float32(tmp_path):
    from clusterlab.data.views import Views
    from clusterlab.errors import ConfigError
    from clusterlab.features import digest

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pth")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)

    def net(**init_args) -> Pretrained:
        return Pretrained("resnet18", weights=str(tmp_path / "w.pth"), **{"image_size": 64, **init_args})

    key = digest(net(), Views(), images)
    assert digest(net(), Views(), images) == key
    # the input size, the normalisation (buffers outside the state) and the precision: other features
    for other in ({"image_size": 96}, {"mean": (0.5, 0.5, 0.5)}, {"precision": "bf16"}):
        assert digest(net(**other), Views(), images) != key, other
    x = torch.rand(8, 3, 32, 32)
    fp32, bf16 = net()(x), net(precision="bf16")(x)
    assert net().net.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # frozen: NHWC
    assert fp32.dtype == bf16.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99
    reference = plain_resnet18_features(tmp_path / "w.pth", x, 64)  # the plain NCHW float32 network
    torch.testing.assert_close(fp32, reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="precision bf16 is for a frozen network"):
        net(precision="bf16", frozen=False)
