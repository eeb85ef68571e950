"""Runs that never lose work and never lie, through the real CLI in real processes: kills at any
moment, Ctrl-C, concurrent runs, stages that keep to their own directories, divergence and
collapse, and one clear line for each user error."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clusterlab.cli import main
from tests.helpers import TINY_CC, TINY_CC_FIGURES, state, user_error
from tests.launch import clusterlab, environment

FIT = ["fit", "--config", "tiny.yaml"]


def write_tiny(folder: Path, figures: bool = False, **overrides: str) -> None:
    text = TINY_CC_FIGURES if figures else TINY_CC
    for key, value in overrides.items():
        text = text.replace(f"  {key}: ", f"  {key}: {value}  # ", 1)
    (folder / "tiny.yaml").write_text(text)


def _as_in_a_terminal() -> None:
    # SIGINT ignored is inherited across exec (a shell's background job; in the full suite the
    # Ctrl-C test's run exited 0 twice, never alone): the run starts as from a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(folder: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "clusterlab", *args],
        cwd=folder,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_as_in_a_terminal,
    )


def the_run(folder: Path, name: str) -> Path:
    [run_dir] = [p for p in (folder / "runs" / name).iterdir() if p.is_dir()]
    return run_dir


def first_checkpoint(folder: Path, name: str) -> Path:
    """The last.ckpt of the run `name` once it exists (waits up to 60 s)."""
    for _ in range(600):
        checkpoint = next((folder / "runs" / name).glob("*/checkpoints/last.ckpt"), None)
        if checkpoint is not None:
            return checkpoint
        time.sleep(0.1)
    raise AssertionError(f"run {name} wrote no checkpoint within 60 s")


def assert_same_weights(expected: dict, got: dict) -> None:
    assert got["epoch"] == expected["epoch"] and got["global_step"] == expected["global_step"]
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name


def logged(run_dir: Path) -> list[tuple[str, str, str]]:
    """(metric, epoch, step) of every value in metrics.csv."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        (k, row["epoch"], row["step"])
        for row in rows
        for k, v in row.items()
        if v and k not in ("epoch", "step")
    ]


def assert_logged_once_each(run_dir: Path, whole_dir: Path) -> None:
    entries = logged(run_dir)
    assert len(entries) == len(set(entries)), "a step is logged twice"
    expected = logged(whole_dir)
    missing, extra = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    assert not missing and not extra, f"the log differs from the uninterrupted run's: {missing=} {extra=}"


@pytest.mark.slow  # 70 s; test_resume.py kills and resumes every make test
def test_kills_at_random_moments_resume_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """SIGKILL at random times (start-up, training, checkpoint writes, evaluation, figures), then
    `fit --ckpt_path last` each time, until a run ends: the same weights and log as one whole run."""
    write_tiny(tmp_path, figures=True, max_epochs="8", limit_train_batches="6")
    started = time.monotonic()
    whole = clusterlab(*FIT, "--name", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.tail()
    duration = time.monotonic() - started
    rng, kills, args = random.Random(11), [], [*FIT, "--name", "killed"]
    for attempt in range(12):
        process = start(tmp_path, *args)
        # At most half the whole run's time: the run resumed after the first kill takes its
        # start-up plus the work that kill left, over half the whole run, so a second kill always
        # lands (with 0.9 the resumed run could end first). Later kills land later in the training.
        delay = rng.uniform(0.3, 0.5) * duration if attempt < 5 else 300
        try:
            code = process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            kills.append(round(delay, 1))
            if (tmp_path / "runs" / "killed").is_dir():  # killed after its run directory was made
                args = [*FIT, "--name", "killed", "--ckpt_path", "last"]
            continue
        assert code == 0, process.stderr.read()[-3000:]
        break
    else:
        raise AssertionError("the run never finished")
    assert len(kills) >= 2, f"killed at {kills} s of a {duration:.1f} s run"
    run_dir = the_run(tmp_path, "killed")  # every part continued in the same directory
    assert_same_weights(state(tmp_path / "runs" / "whole"), state(tmp_path / "runs" / "killed"))
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 8
    assert_logged_once_each(run_dir, the_run(tmp_path, "whole"))


@pytest.mark.slow  # 34 s; SIGTERM's stop (below) and test_resume.py's kill and resume run every make test
def test_ctrl_c_stops_with_a_message_and_resumes_to_the_same_weights(tmp_path):
    write_tiny(tmp_path, max_epochs="12")
    whole = clusterlab(*FIT, "--name", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.tail()
    # Ctrl-C inside epoch 3, once the run has checkpoints: sent from inside the run at a given
    # batch, so that it always lands in training, however loaded the machine.
    ctrl_c = [
        "--trainer.callbacks+=tests.helpers.KillAt",
        "--trainer.callbacks.epoch=3",
        "--trainer.callbacks.batch=1",
        "--trainer.callbacks.signal_name=SIGINT",
    ]
    process = start(tmp_path, *FIT, "--name", "stopped", *ctrl_c)
    assert process.wait(timeout=120) == 1
    checkpoint = first_checkpoint(tmp_path, "stopped")
    assert not (checkpoint.parent.parent / "metrics.json").exists()  # no report of an unfinished run
    resumed = clusterlab(*FIT, "--name", "stopped", "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.tail()
    assert_same_weights(state(tmp_path / "runs" / "whole"), state(tmp_path / "runs" / "stopped"))


def test_sigterm_stops_with_the_message_and_a_failing_exit_code(tmp_path):
    """A scheduler's SIGTERM (a pre-empted job): the run keeps its checkpoint, writes no report,
    says how to continue, and exits 143, so that the scheduler does not record a finished run."""
    write_tiny(tmp_path, max_epochs="200")
    process = start(tmp_path, *FIT, "--name", "terminated")
    checkpoint = first_checkpoint(tmp_path, "terminated")
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    assert "Interrupted. The run keeps" in process.stderr.read()
    assert not (checkpoint.parent.parent / "metrics.json").exists()


def test_a_checkpoint_inside_an_epoch_resumes_with_the_batch_it_would_have_trained_on_next(tmp_path):
    """`--checkpoint_every_minutes` (here: after every batch) writes last.ckpt inside epochs;
    a kill after batch 2 of epoch 2 resumes at batch 2, with the same data, draws and weights."""
    write_tiny(tmp_path)
    every_batch = ["--checkpoint_every_minutes", "0.000001"]
    whole = clusterlab(*FIT, "--name", "whole", *every_batch, cwd=tmp_path)
    assert whole.returncode == 0, whole.tail()
    kill = [
        "--trainer.callbacks+=tests.helpers.KillAt",
        "--trainer.callbacks.epoch=2",
        "--trainer.callbacks.batch=2",
    ]
    killed = clusterlab(*FIT, "--name", "killed", *every_batch, *kill, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    at_kill = state(tmp_path / "runs" / "killed")
    assert (at_kill["epoch"], at_kill["global_step"]) == (2, 8)  # inside epoch 2, after 2 of its 3 batches
    resumed = clusterlab(*FIT, "--name", "killed", "--ckpt_path", "last", *every_batch, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.tail()
    assert_same_weights(state(tmp_path / "runs" / "whole"), state(tmp_path / "runs" / "killed"))
    assert_logged_once_each(the_run(tmp_path, "killed"), the_run(tmp_path, "whole"))


@pytest.mark.slow  # 22 s; tests/test_runs.py makes one name from many threads at once every make test
def test_runs_started_together_never_share_a_directory(tmp_path):
    write_tiny(tmp_path, max_epochs="2")
    processes = [start(tmp_path, *FIT) for _ in range(3)]
    assert [p.wait(timeout=300) for p in processes] == [0, 0, 0]
    runs = sorted(p for p in (tmp_path / "runs" / "tiny").iterdir())
    assert len(runs) == 3
    for run_dir in runs:
        assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2
        assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
        entries = logged(run_dir)
        assert len(entries) == len(set(entries))


def test_stages_never_touch_the_fits_files_and_every_saved_config_loads_everywhere(in_tmp, capsys):
    write_tiny(in_tmp, max_epochs="2")
    main(FIT)
    run_dir = the_run(in_tmp, "tiny")
    config, checkpoint = str(run_dir / "config.yaml"), str(run_dir / "checkpoints" / "last.ckpt")
    fit_files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for stage in ("test", "predict", "test", "validate"):
        main([stage, "--config", config, "--ckpt_path", checkpoint])
    stage_dirs = [p for p in run_dir.iterdir() if p.name.startswith(("test-", "predict-", "validate-"))]
    assert sorted(p.name.split("-")[0] for p in stage_dirs) == ["predict", "test", "test", "validate"]
    assert {p: p.read_bytes() for p in fit_files} == fit_files  # byte-identical
    for saved in [run_dir / "config.yaml", *(p / "config.yaml" for p in stage_dirs)]:
        for stage in ("fit", "test", "predict"):  # every saved config loads in every subcommand
            with pytest.raises(SystemExit) as done:
                main([stage, "--config", str(saved), "--print_config"])
            assert done.value.code == 0, capsys.readouterr().err
    tested = json.loads(next(run_dir.glob("test-*/metrics.json")).read_text())
    assert tested["epochs"] == 2 and tested["stage"] == "test" and tested["steps"] == 6
    # ... and the fit continues from its own config and checkpoint, in its own directory.
    main(["fit", "--config", config, "--ckpt_path", checkpoint, "--trainer.max_epochs", "3"])
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3
    assert len(list((in_tmp / "runs" / "tiny").iterdir())) == 1


# -- divergence and collapse --------------------------------------------------------------------


def test_a_diverging_run_stops_at_that_step_with_one_line_and_no_report(in_tmp, capsys):
    write_tiny(in_tmp, figures=True)
    line = user_error(
        capsys,
        *FIT,
        "--model.init_args.optimizer",
        "torch.optim.SGD",
        "--model.init_args.optimizer.init_args.lr",
        "1e30",
    )
    assert "CC diverged: non-finite loss at epoch 0, step 1 (lr 1e+30)" in line and "instance = nan" in line
    assert not list(in_tmp.glob("runs/*/*/metrics.json")) and not list(in_tmp.glob("runs/*/*/figures"))


def test_parameters_that_are_no_longer_finite_stop_the_run():
    from clusterlab.data.views import Views
    from clusterlab.errors import DivergenceError
    from clusterlab.methods import CC
    from clusterlab.nn import SmallCNN

    model = CC(10, SmallCNN(1, (8, 16), (False, True)), Views())
    model.on_train_batch_end(None, None, 0)  # finite: nothing happens
    with torch.no_grad():
        model.backbone.net[0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(DivergenceError, match=r"parameters are no longer finite .* backbone.net.0.weight"):
        model.on_train_batch_end(None, None, 0)


def test_a_collapsed_run_ends_with_a_warning_in_the_report_and_metrics_json(in_tmp, capsys):
    write_tiny(in_tmp, max_epochs="2")
    main([*FIT, "--model.init_args.optimizer.init_args.lr", "100"])
    report = json.loads((the_run(in_tmp, "tiny") / "metrics.json").read_text())
    sizes = report["cluster_sizes"]
    assert report["collapsed"] is True and sum(sizes) == 1797
    assert max(sizes) > 0.9 * 1797 or sum(s > 0 for s in sizes) < 5
    assert "the clusters collapsed" in " ".join(capsys.readouterr().out.split())
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["threads"] >= 1


def test_collapse_is_judged_from_cluster_sizes_alone():
    from clusterlab.methods.base import collapsed

    assert (
        collapsed([1797, 0, 0, 0])
        and collapsed([95, 5, 0, 0, 0, 0])
        and collapsed([30, 30, 30, 0, 0, 0, 0, 0])
    )
    assert not collapsed([50, 40, 30, 20]) and not collapsed([0, 0, 0, 0])


# -- wrong inputs: one line each ------------------------------------------------------------------


def test_a_truncated_checkpoint_is_named(in_tmp, capsys):
    write_tiny(in_tmp, max_epochs="1")
    main(FIT)
    checkpoint = the_run(in_tmp, "tiny") / "checkpoints" / "last.ckpt"
    broken = in_tmp / "broken.ckpt"
    broken.write_bytes(checkpoint.read_bytes()[:5000])
    line = user_error(capsys, "test", "--config", "tiny.yaml", "--ckpt_path", str(broken))
    assert f"cannot read checkpoint {broken}" in line


def test_an_unwritable_runs_dir_is_named_and_nothing_is_written_elsewhere(in_tmp, capsys):
    write_tiny(in_tmp, max_epochs="1")
    (in_tmp / "a_file").write_text("not a folder")
    line = user_error(capsys, *FIT, "--runs_dir", "a_file/runs")
    assert "cannot create the run folder a_file/runs/tiny" in line and "--runs_dir" in line
    assert sorted(p.name for p in in_tmp.iterdir()) == ["a_file", "tiny.yaml"]


def test_a_missing_data_set_is_one_line(in_tmp, capsys):
    write_tiny(in_tmp, max_epochs="1")
    line = user_error(capsys, *FIT, "--data.dataset", "cifar10", "--data.root", "nowhere")
    assert "cifar10: no data set at nowhere" in line and "cifar-10-python.tar.gz" in line


def digit_folder(root: Path, classes: list[str], per_class: int = 20) -> None:
    from PIL import Image

    from clusterlab.data.sources import Digits

    digits = Digits().load("train+test")
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.labels == c][:per_class]):
            Image.fromarray(image[0].numpy()).convert("RGB").resize((16, 16)).save(root / name / f"{i}.png")


def test_corrupt_images_are_all_listed_with_their_count(in_tmp, capsys):
    write_tiny(in_tmp, max_epochs="1")
    digit_folder(in_tmp / "photos", ["zero", "one"])
    for i in range(3):
        (in_tmp / "photos" / "one" / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken" if i else b"")
    folder = ["--data.dataset", "image_folder", "--data.root", "photos", "--data.image_size", "8"]
    line = user_error(capsys, *FIT, *folder)
    assert "3 of the 43 images under photos cannot be read" in line and "--data.on_error skip" in line
    listed = Path(line.split("listed in ")[1].split(")")[0])
    with open(in_tmp / listed, newline="") as f:
        assert sorted(Path(r["path"]).name for r in csv.DictReader(f)) == ["bad0.png", "bad1.png", "bad2.png"]


def test_image_folders_count_classes_only_from_two_sub_folders_and_check_the_clusters(in_tmp, capsys):
    write_tiny(in_tmp, max_epochs="1", batch_size="8")
    digit_folder(in_tmp / "one_class", ["only"])
    folder = [
        *FIT,
        "--data.dataset",
        "image_folder",
        "--data.image_size",
        "8",
        "--data.channels",
        "1",
        "--data.root",
        "one_class",
    ]
    line = user_error(capsys, *folder)
    assert "no class sub-folders" in line and "--data.num_clusters" in line
    assert "at least 2 clusters" in user_error(capsys, *folder, "--data.num_clusters", "1")
    assert "50 clusters for the 20 images" in user_error(capsys, *folder, "--data.num_clusters", "50")
    main([*folder, "--data.num_clusters", "2"])
    report = json.loads(next(in_tmp.glob("runs/*/*/metrics.json")).read_text())
    assert report["num_clusters"] == 2 and report["acc"] is None  # no labels: nothing to score


def test_the_data_channels_reach_the_backbone(in_tmp):
    write_tiny(in_tmp, max_epochs="1", batch_size="8")
    digit_folder(in_tmp / "colour", ["zero", "one"])
    main(
        [
            *FIT,
            "--data.dataset",
            "image_folder",
            "--data.root",
            "colour",
            "--data.image_size",
            "8",
            "--data.channels",
            "3",
        ]
    )
    weights = state(in_tmp / "runs" / "tiny")["state_dict"]["backbone.net.0.weight"]
    assert weights.shape[1] == 3
