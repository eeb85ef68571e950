"""Values that cannot work are refused in one line before anything is made; values given take
effect; a full disk says where and what was kept; the libraries' noise stays out of a run's output."""

from __future__ import annotations

import json
import sys

import pytest

from clusterlab.cli import ClusterLabCLI
from tests.helpers import TINY_CC, TINY_CC_FIGURES, user_error
from tests.launch import REPO, clusterlab, environment, run

BAD_VALUES = [
    (["--data.batch_size", "0"], "--data.batch_size 0: every method contrasts the images of a batch"),
    (["--data.batch_size", "-5"], "--data.batch_size -5: every method contrasts the images of a batch"),
    (["--data.eval_batch_size", "0"], "--data.eval_batch_size 0: give at least 1"),
    (["--data.num_workers", "-1"], "--data.num_workers -1: give 0 (no workers) or more"),
    (["--data.num_clusters", "1"], "--data.num_clusters 1: clustering needs at least 2 clusters"),
    (["--data.image_size", "0"], "--data.image_size 0: only --data.dataset image_folder reads it"),
    (["--data.image_size", "32"], "--data.image_size 32: only --data.dataset image_folder reads it"),
    (["--data.stream", "true"], "--data.stream True: only --data.dataset image_folder reads it"),
    (["--data.max_pixels", "100"], "--data.max_pixels 100: only --data.dataset image_folder reads it"),
    (
        ["--data.dataset", "image_folder", "--data.root", ".", "--data.max_pixels", "10"],
        "--data.max_pixels 10: every image would be skipped; give at least 64",
    ),
    (["--trainer.max_epochs", "-5"], "--trainer.max_epochs -5: give a number of epochs >= 0, or -1"),
    (["--trainer.max_steps", "-3"], "--trainer.max_steps -3: give a number of steps >= 0, or -1"),
    (["--trainer.check_val_every_n_epoch", "0"], "--trainer.check_val_every_n_epoch 0: give 1 or more"),
    (["--trainer.limit_train_batches", "1.5"], "--trainer.limit_train_batches 1.5: give a fraction"),
    (["--checkpoint_every_minutes", "0"], "--checkpoint_every_minutes 0: give a number of minutes above 0"),
    (["--checkpoint_every_minutes", "-1"], "--checkpoint_every_minutes -1: give a number of minutes above 0"),
    (
        ["--data.num_clusters", "12", "--model.init_args.num_clusters", "11"],
        "--model.init_args.num_clusters 11 and --data.num_clusters 12 disagree",
    ),
    (
        ["--model.init_args.backbone.init_args.in_channels", "3"],
        "--model.init_args.backbone.init_args.in_channels 3: the digits images have 1 channel(s)",
    ),
]


@pytest.mark.parametrize(
    "args, expected", BAD_VALUES, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_a_bad_value_is_one_line_at_parse_time_and_makes_no_run_folder(in_tmp, capsys, args, expected):
    (in_tmp / "tiny.yaml").write_text(TINY_CC)
    line = user_error(capsys, "fit", "--config", "tiny.yaml", *args)
    assert line.startswith("clusterlab: error: ") and expected in line, line
    assert not (in_tmp / "runs").exists()


def test_a_batch_larger_than_the_data_is_one_line(in_tmp, capsys):
    (in_tmp / "tiny.yaml").write_text(TINY_CC)
    line = user_error(capsys, "fit", "--config", "tiny.yaml", "--data.batch_size", "100000")
    assert "1797 images do not fill one global batch of 100000 x 1 processes; lower --data.batch_size" in line


def test_the_models_number_of_clusters_takes_effect_through_the_data(in_tmp):
    (in_tmp / "tiny.yaml").write_text(TINY_CC)
    cli = ClusterLabCLI(args=["--config", "tiny.yaml", "--model.init_args.num_clusters", "12"], run=False)
    assert cli.model.num_clusters == 12 and cli.datamodule.num_clusters == 12
    cli = ClusterLabCLI(args=["--config", "tiny.yaml", "--data.num_clusters", "7"], run=False)
    assert cli.model.num_clusters == 7


def test_the_data_module_refuses_the_same_values_in_python():
    from clusterlab.data.datamodule import ClusterDataModule
    from clusterlab.errors import ConfigError

    with pytest.raises(ConfigError, match="--data.batch_size 1: every method contrasts"):
        ClusterDataModule(batch_size=1)
    with pytest.raises(ConfigError, match="--data.image_size 4: use at least 8 pixels"):
        ClusterDataModule(dataset="image_folder", root=".", image_size=4)


def run_with_file_size_limit(limit_bytes: int, *args: str, cwd) -> object:
    """`clusterlab *args` in a process that cannot write a file past `limit_bytes`: every write
    past it fails with EFBIG, as writes to a full disk fail with ENOSPC (the signal such a write
    also sends is ignored, as a shell does for a program under `ulimit -f`)."""
    bootstrap = (
        "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes})); "
        "sys.argv = ['clusterlab', *sys.argv[1:]]; runpy.run_module('clusterlab', run_name='__main__')"
    )
    return run([sys.executable, "-c", bootstrap, *args], cwd, timeout=300, env=environment(PYTHONPATH=REPO))


def test_a_full_disk_under_runs_dir_names_the_path_and_what_was_kept(tmp_path, monkeypatch):
    from clusterlab.cli import main

    (tmp_path / "tiny.yaml").write_text(TINY_CC)
    done = run_with_file_size_limit(
        40_000, "fit", "--config", "tiny.yaml", "--trainer.max_epochs", "2", cwd=tmp_path
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.tail()
    errors = [line for line in lines if line.startswith("clusterlab: error")]
    assert len(errors) == 1, done.tail()
    assert "cannot write the checkpoint " in errors[0] and "checkpoints/last.ckpt: " in errors[0]
    assert "no checkpoint was kept: free some space (or pass another --runs_dir) and start again" in errors[0]
    assert not list(tmp_path.glob("runs/tiny/*/checkpoints/.last.ckpt.*.tmp"))  # no partial file left

    # With a checkpoint already written, the message says that it is kept and how to continue.
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", "tiny.yaml", "--trainer.max_epochs", "1"])
    (run_dir,) = [p for p in (tmp_path / "runs" / "tiny").iterdir() if (p / "checkpoints").is_dir()]
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    done = run_with_file_size_limit(
        40_000,
        "fit",
        "--config",
        "tiny.yaml",
        "--trainer.max_epochs",
        "2",
        "--ckpt_path",
        "last",
        cwd=tmp_path,
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("clusterlab: error")]
    assert done.returncode == 1 and len(errors) == 1 and "Traceback" not in done.stderr, done.tail()
    assert f"cannot write the checkpoint {run_dir}/checkpoints/last.ckpt" in errors[0]
    assert "the previous last.ckpt is kept: free some space, then continue with --ckpt_path last" in errors[0]
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before


def test_a_normal_run_shows_no_library_deprecations_or_advertisements(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_CC_FIGURES)  # matplotlib's and t-SNE's too
    done = clusterlab(
        "fit",
        "--config",
        "tiny.yaml",
        "--trainer.max_epochs",
        "1",
        cwd=tmp_path,
        env=environment(PYTHONWARNINGS=""),
    )
    assert done.returncode == 0, done.tail()
    shown = done.stdout + done.stderr
    for noise in ("deprecated", "Deprecat", "FutureWarning", "Tip:", "litlogger", "anonymous setting"):
        assert noise not in shown, (noise, done.tail())
    # Our own warnings stay: a collapsed run says so.
    report = json.loads(next((tmp_path / "runs" / "tiny").glob("*/metrics.json")).read_text())
    assert ("clusters collapsed" in shown) == bool(report["collapsed"])


def test_colour_codes_reach_an_error_line_only_on_a_terminal():
    import io

    from clusterlab.console import plain

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    coloured = "clusterlab: error: checkpoint \x1b[1mx.ckpt\x1b[0m is \x1b[31mNNM\x1b[0m"
    assert plain(coloured, io.StringIO()) == "clusterlab: error: checkpoint x.ckpt is NNM"
    assert plain(coloured, Terminal()) == coloured


def test_a_checkpoint_whose_weights_do_not_fit_its_model_is_one_line(in_tmp, capsys):
    """A checkpoint rebuilds the model it records (Lightning's rule for `--ckpt_path`); weights that
    do not fit that model (a file edited by hand, or of another version) are one line, not a list of
    every key."""
    import torch

    from clusterlab.cli import main

    (in_tmp / "tiny.yaml").write_text(TINY_CC)
    main(["fit", "--config", "tiny.yaml", "--trainer.max_epochs", "1"])
    (trained,) = (in_tmp / "runs" / "tiny").glob("*/checkpoints/last.ckpt")
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["hyper_parameters"]["backbone"]["init_args"]["widths"] = [8, 32]
    edited = in_tmp / "edited.ckpt"
    torch.save(checkpoint, edited)
    wider = "--model.init_args.backbone.init_args.widths=[8, 32]"  # as the edited checkpoint says
    line = user_error(capsys, "test", "--config", "tiny.yaml", "--ckpt_path", str(edited), wider)
    import re

    assert re.search(
        rf"checkpoint {edited}: its weights do not fit this config's CC \(\d+ problem\(s\); first: size "
        r"mismatch for backbone\.net\.\d+\.weight: copying a param with shape torch.Size\(\[16, 8, 3, 3\]\)",
        line,
    ), line
    assert line.endswith(
        "Use the config the checkpoint was trained with (its run directory has config.yaml)."
    )


def test_a_model_setting_that_a_checkpoint_would_override_is_refused(in_tmp, capsys):
    """LightningCLI rebuilds a checkpoint's model from its hyper-parameters, over the config's: a
    model value given with --ckpt_path that differs from the checkpoint's would be ignored."""
    from clusterlab.cli import main

    (in_tmp / "tiny.yaml").write_text(TINY_CC)
    main(["fit", "--config", "tiny.yaml", "--trainer.max_epochs", "1"])
    (checkpoint,) = (in_tmp / "runs" / "tiny").glob("*/checkpoints/last.ckpt")
    line = user_error(
        capsys,
        "test",
        "--config",
        "tiny.yaml",
        "--ckpt_path",
        str(checkpoint),
        "--model.init_args.optimizer.init_args.lr",
        "0.01",
    )
    assert line == (
        f"clusterlab: error: --model.init_args.optimizer.init_args.lr 0.01: the checkpoint {checkpoint} was "
        "trained with 0.001, and a checkpoint rebuilds the model it was trained with, so this value would be "
        "ignored. Use the config it was trained with (its run directory has config.yaml), or fit a new run"
    )
    line = user_error(
        capsys, "fit", "--config", "tiny.yaml", "--ckpt_path", "last", "--model.init_args.num_heads", "2"
    )
    assert line.startswith("clusterlab: error: --model.init_args.num_heads 2: the checkpoint ")
    # The same config, or the run's own config.yaml, is no difference.
    main(["test", "--config", "tiny.yaml", "--ckpt_path", str(checkpoint)])
    main(["test", "--config", str(checkpoint.parent.parent / "config.yaml"), "--ckpt_path", str(checkpoint)])


def test_a_run_without_the_progress_bar_runs(in_tmp, capsys):
    """--trainer.enable_progress_bar false: Lightning refuses any progress-bar callback beside it, so
    the CLI leaves its own out, rather than the run ending in Lightning's traceback."""
    from clusterlab.cli import main

    (in_tmp / "tiny.yaml").write_text(TINY_CC)
    main(
        [
            "fit",
            "--config",
            "tiny.yaml",
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    (metrics,) = (in_tmp / "runs" / "tiny").glob("*/metrics.json")
    assert json.loads(metrics.read_text())["epochs"] == 1
