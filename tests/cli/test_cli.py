"""The `clusterlab` command: configs, run directories, reports and the messages at the edges."""

import json
import re
from pathlib import Path

import pytest
import torch

from clusterlab.cli import ClusterLabCLI, main
from clusterlab.methods import CC
from clusterlab.methods.base import CheckpointMismatchError
from tests.helpers import REPO, TINY_CC, TINY_CC_FIGURES, save_pretext, tiny_config, user_error

# Every paper config: the top-level files only. experiments/base/*.yaml are the blocks they name
# (a backbone, views, an optimizer...), not configs to run (tests/test_experiments.py).
EXPERIMENTS = sorted(Path(REPO, "experiments").glob("*.yaml"))


def tiny_data_root(config: Path, tmp: Path) -> list[str]:
    """--data.root for a config: a tiny copy of its data set, in the real format."""
    import yaml

    from tests import formats

    data = yaml.safe_load(config.read_text())["data"]
    dataset, root = data.get("dataset", "digits"), tmp / "data"
    writers = {
        "cifar10": formats.write_cifar10,
        "cifar20": formats.write_cifar100,
        "stl10": formats.write_stl10,
        "fashion_mnist": formats.write_fashion_mnist,
        "image_folder": formats.write_png_folder,
    }
    if dataset not in writers:
        return []
    if dataset == "image_folder":  # at least as many images as the config's clusters
        writers[dataset](root, per_class=max(3, -(-int(data.get("num_clusters") or 0) // 2)), size=(12, 10))
    else:
        writers[dataset](root)
    return ["--data.root", str(root)]


def pretext_checkpoint(config: Path, data_args: list[str], tmp: Path) -> list[str]:
    """An NNM or TEMI config that names its pretext's checkpoint: make one (untrained) with the matching
    simclr_<dataset>.yaml, and point the config at it."""
    method = config.stem.split("_", 1)[0]
    if "pretext_checkpoint:" not in config.read_text():  # TEMI on a Pretrained network: none
        return []
    pretext_config = config.with_name(config.name.replace(f"{method}_", "simclr_", 1))
    pretext = ClusterLabCLI(args=["--config", str(pretext_config), *data_args], run=False).model
    return ["--model.init_args.pretext_checkpoint", save_pretext(pretext, tmp / "pretext.ckpt")]


def setup_args(config: Path, tmp: Path) -> list[str]:
    data_args = tiny_data_root(config, tmp)
    # A pretrained network embeds every training image once: at 32 px, not 224, for a test (digits,
    # the embedded data set, is not made tiny: 1,797 images).
    text = config.read_text()
    pretrained = "base/backbone_efficientnet_lite0.yaml" in text or "base/backbone_vit_b16.yaml" in text
    small = ["--model.init_args.backbone.init_args.image_size", "32"] if pretrained else []
    if "num_clusters: 200" in text:  # its 200 images (one per cluster) through a 64-px ResNet-34 for
        # small inputs take 20 s an evaluation on a CPU: at 32 px for a test
        small += ["--data.image_size", "32", "--model.init_args.views.init_args.size", "32"]
    if "base/backbone_vit_b16.yaml" in text:  # its weights are a user's file: a random ResNet-18's here
        small += ["--model.init_args.backbone.init_args.name", "resnet18"]
        small += ["--model.init_args.backbone.init_args.weights", random_resnet18(tmp)]
    return [*data_args, *pretext_checkpoint(config, data_args, tmp), *small]


def random_resnet18(tmp: Path) -> str:
    import torchvision

    path = tmp / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return str(path)


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_parses_and_builds_through_the_cli(config, in_tmp):
    cli = ClusterLabCLI(args=["--config", str(config), *setup_args(config, in_tmp)], run=False)
    assert isinstance(cli.model, torch.nn.Module) and cli.model.num_clusters == cli.datamodule.num_clusters
    assert cli.run_dir.parent == Path("runs", config.stem)


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_trains_a_step_on_its_real_data_format(config, in_tmp):
    """fast_dev_run through the real loaders, views, backbone and loss of each paper setting."""
    main(
        [
            "fit",
            "--config",
            str(config),
            *setup_args(config, in_tmp),
            "--trainer.fast_dev_run",
            "1",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--data.batch_size",
            "4",
            "--trainer.logger",
            "false",
            "--kmeans_baseline",
            "false",
        ]
    )
    report = json.loads(next((in_tmp / "runs" / config.stem).glob("*/metrics.json")).read_text())
    assert report["steps"] == 1 and report["acc"] is not None


def test_help_says_what_clusterlab_is_and_lists_every_command(capsys):
    main(["--help"])
    printed = capsys.readouterr().out
    assert "deep image clustering" in printed and "Lightning Trainer command line tool" not in printed
    listed = printed.split("commands:\n")[1].split("\n\n")[0]
    commands = re.findall(r"^  (\w+) ", listed, flags=re.MULTILINE)  # continued lines are indented more
    assert commands == ["fit", "validate", "test", "predict", "cluster", "env"]
    for command in ("fit", "cluster", "env"):  # each command's own help is its options
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert "--help" in capsys.readouterr().out


def test_print_config_shows_the_resolved_config(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(Path(REPO, "experiments/cc_cifar10.yaml")), "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert (
        "class_path: clusterlab.methods.CC" in printed and "lr: 0.0003" in printed and "depth: 34" in printed
    )


@pytest.mark.parametrize(
    "override,expected",
    [
        (
            ["--model.init_args.instance_temprature", "0.3"],
            "unknown config key 'model.init_args.instance_temprature': clusterlab.methods.CC has no option "
            "'instance_temprature'. Did you mean 'instance_temperature'?",
        ),
        (["--data.datset", "cifar10"], "unknown config key 'data.datset'. Did you mean 'data.dataset'?"),
    ],
)
def test_an_unknown_config_key_is_named_in_one_message(override, expected, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(Path(REPO, "experiments/cc_digits.yaml")), *override])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 2 and "usage:" not in err


def test_an_unknown_key_in_a_yaml_file_is_named_with_its_full_path(in_tmp, capsys):
    (in_tmp / "bad.yaml").write_text(
        "model:\n  init_args:\n    backbone:\n      init_args:\n        widht: 3\n"
    )
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(Path(REPO, "experiments/cc_digits.yaml")), "--config", "bad.yaml"])
    err = capsys.readouterr().err
    assert (
        "unknown config key 'model.init_args.backbone.init_args.widht'" in err
        and "Did you mean 'widths'?" in err
    )


def fit_tiny(tmp, *args, figures: bool = False):
    (tmp / "tiny.yaml").write_text(TINY_CC_FIGURES if figures else TINY_CC)
    main(["fit", "--config", "tiny.yaml", "--trainer.max_epochs", "2", *args])
    return next((tmp / "runs" / "tiny").iterdir())


def test_fit_writes_config_metrics_and_checkpoint_and_prints_the_report(in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("CLUSTERLAB_RUN_DIR_FILE", str(in_tmp / "told.txt"))
    run_dir = fit_tiny(in_tmp, "--kmeans_baseline", "true", figures=True)
    # The run tells a program that started it where it wrote, in the file that program named.
    assert (in_tmp / "told.txt").read_text() == f"{Path('runs', 'tiny', run_dir.name)}\n"
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["method"] == "CC" and report["dataset"] == "digits" and report["seed"] == 3
    assert report["epochs"] == 2 and report["num_samples"] == 1797 and report["wall_time_s"] > 0
    figures = {"acc", "nmi", "ari", "ami", "many_to_one_acc"}  # every head's; the selected one's at the top
    assert 0 < report["acc"] <= 1 and set(report["heads"][0]) == figures and figures <= set(report)
    assert (
        report["many_to_one_acc"] >= report["acc"] and report["num_classes"] == report["num_clusters"] == 10
    )
    assert report["kmeans"]["acc"] == pytest.approx(0.79, abs=0.02)
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "metrics.csv").exists()
    assert sorted(p.name for p in (run_dir / "figures").iterdir()) == [
        "confident.png",
        "confusion.png",
        "embedding.png",
    ]
    out = capsys.readouterr().out
    assert "k-means (pixels)" in out and f"Run directory: {Path('runs', 'tiny', run_dir.name)}" in out


def test_wandb_runs_offline_without_login_or_network(in_tmp, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(in_tmp))
    monkeypatch.setenv("NETRC", str(in_tmp / "no-netrc"))
    (in_tmp / "tiny.yaml").write_text(
        tiny_config(
            trainer={
                "logger": [
                    {"class_path": "clusterlab.loggers.CSVLogger"},
                    {"class_path": "clusterlab.loggers.WandbLogger"},
                ]
            }
        )
    )
    main(["fit", "--config", "tiny.yaml", "--trainer.max_epochs", "1"])
    run_dir = next((in_tmp / "runs" / "tiny").iterdir())
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run"


def test_a_nan_loss_stops_the_run_naming_the_term_step_and_learning_rate(in_tmp, capsys):
    (in_tmp / "tiny.yaml").write_text(TINY_CC)
    line = user_error(capsys, "fit", "--config", "tiny.yaml", "--model.init_args.instance_temperature", "0.0")
    assert "CC diverged: non-finite loss at epoch 0, step 0 (lr 0.001): instance = nan" in line


def test_resuming_without_an_earlier_run_says_so(in_tmp, capsys):
    (in_tmp / "tiny.yaml").write_text(TINY_CC)
    assert "no run of this name to continue" in user_error(
        capsys, "fit", "--config", "tiny.yaml", "--ckpt_path", "last"
    )


def test_test_and_predict_rebuild_the_model_from_the_checkpoint(in_tmp):
    run_dir = fit_tiny(in_tmp)
    fitted = json.loads((run_dir / "metrics.json").read_text())
    checkpoint = str(run_dir / "checkpoints/last.ckpt")
    cli = ClusterLabCLI(args=["test", "--config", "tiny.yaml", "--ckpt_path", checkpoint])
    assert cli.model.eval_results["acc"] == pytest.approx(fitted["acc"], abs=1e-9)
    tested = json.loads((cli.run_dir / "metrics.json").read_text())
    assert tested["stage"] == "test" and tested["epochs"] == 2 and tested["checkpoint"] == checkpoint
    assert tested["acc"] == pytest.approx(fitted["acc"], abs=1e-9)
    assert cli.run_dir.parent == run_dir and cli.run_dir.name.startswith("test-")  # inside the fit's run
    cli = ClusterLabCLI(args=["predict", "--config", "tiny.yaml", "--ckpt_path", checkpoint])
    assert cli.run_dir.parent == run_dir and cli.run_dir.name.startswith("predict-")


def test_ich_only_ablation_clusters_by_kmeans_in_the_instance_space(in_tmp):
    """cc-paper Table 5, "ICH only": no cluster head is trained; k-means centres give the clusters."""
    run_dir = fit_tiny(
        in_tmp,
        "--model.init_args.use_cluster_loss",
        "false",
        "--model.init_args.use_cluster_entropy",
        "false",
    )
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["acc"] > 0.3  # well above chance (0.1) after 2 tiny epochs
    centroids = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)["state_dict"][
        "cluster_head.centroids"
    ]
    assert centroids.shape == (10, 128) and centroids.abs().sum() > 0


def test_a_checkpoint_of_another_method_is_refused_with_one_message(in_tmp, capsys):
    run_dir = fit_tiny(in_tmp)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint["clusterlab"]["method"] = "NNM"
    foreign = in_tmp / "nnm.ckpt"
    torch.save(checkpoint, foreign)
    line = user_error(capsys, "test", "--config", "tiny.yaml", "--ckpt_path", str(foreign))
    assert f"checkpoint {foreign} is NNM (10 clusters, 1x8x8, 2 epochs); the config asks for CC" in line
    del checkpoint["clusterlab"]
    torch.save(checkpoint, foreign)
    assert "was not written by clusterlab" in user_error(
        capsys, "test", "--config", "tiny.yaml", "--ckpt_path", str(foreign)
    )
    # Loaded in Python without the CLI, the method itself refuses it too.
    with pytest.raises(CheckpointMismatchError, match="was not written by clusterlab"):
        CC.load_from_checkpoint(foreign)


def test_online_prediction_of_a_single_image():
    from clusterlab.data.sources import Digits
    from clusterlab.data.views import SmallImageViews
    from clusterlab.nn import SmallCNN

    model = CC(10, SmallCNN(1, (8, 16), (False, True)), SmallImageViews()).eval()
    image = Digits().load("train+test").images[:1]
    probs = model.predict_proba(image)
    assert probs.shape == (1, 1, 10) and torch.allclose(probs.sum(-1), torch.ones(1, 1))
    out = model.predict_step({"index": torch.tensor([0]), "image": image}, 0)
    assert out["cluster"].shape == (1,) and 0 <= float(out["confidence"]) <= 1


def write_digit_pngs(folder: Path, count: int) -> torch.Tensor:
    from PIL import Image

    from clusterlab.data.sources import Digits

    images = Digits().load("train+test").images[:count]
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"img_{i:03d}.png")
    (folder / "img_500_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return images


@pytest.mark.parametrize("stream", ["false", "true"])
def test_predict_on_a_folder_writes_assignments_and_contact_sheets(in_tmp, stream, capsys):
    import csv

    run_dir = fit_tiny(in_tmp)
    images = write_digit_pngs(in_tmp / "photos", 40)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    cli = ClusterLabCLI(
        args=[
            "predict",
            "--config",
            "tiny.yaml",
            "--ckpt_path",
            str(checkpoint),
            "--data.dataset",
            "image_folder",
            "--data.root",
            "photos",
            "--data.stream",
            stream,
            "--data.eval_batch_size",
            "16",
        ]
    )
    with open(cli.run_dir / "assignments.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == [str(Path("photos", f"img_{i:03d}.png")) for i in range(40)]
    expected = cli.model.eval().predict_proba(images)[0].max(-1)
    assert [int(r["cluster"]) for r in rows] == expected.indices.tolist()
    assert [float(r["confidence"]) for r in rows] == pytest.approx(expected.values.tolist(), abs=1e-4)
    sheets = sorted((cli.run_dir / "clusters").glob("cluster_*.png"))
    assert len(sheets) == len({r["cluster"] for r in rows}) and sheets[0].stat().st_size > 1000
    skipped = (cli.run_dir / "skipped.csv").read_text()
    assert "img_500_broken.png" in skipped
    assert "Skipped 1 unreadable image" in capsys.readouterr().out
