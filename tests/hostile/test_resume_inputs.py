"""`fit --ckpt_path last` against what earlier starts left behind, and the log against a kill at the
worst moment, through the real CLI in real processes: a start that fails before its first
checkpoint leaves no run directory, a newer directory without a checkpoint does not hide the run
that has one, and a SIGKILL right after an epoch's checkpoint keeps that epoch's row in metrics.csv."""

from __future__ import annotations

import csv
import os
import shutil
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from clusterlab.checkpointing import AtomicCheckpointIO
from tests.helpers import tiny_config, user_error
from tests.launch import clusterlab

FIT = ["fit", "--config", "tiny.yaml"]
TWO_EPOCHS = tiny_config(trainer={"max_epochs": 2})


class RecordStart(pl.Callback):
    """Writes where training starts, "<epoch> <global step>", to `path`: "0 0" for a run from scratch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        Path(self.path).write_text(f"{trainer.current_epoch} {trainer.global_step}")


RECORD_START = [
    "--trainer.callbacks+=tests.hostile.test_resume_inputs.RecordStart",
    "--trainer.callbacks.path=start.txt",
]


class KillAfterCheckpoint(AtomicCheckpointIO):
    """Writes every checkpoint as the CLI does, and SIGKILLs its process the moment the one that
    ends `epoch` is in place: nothing the epoch's end would do after it happens."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        if checkpoint["epoch"] == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A folder with tiny.yaml (CC, 2 epochs of 3 batches) and one finished run of it."""
    folder = tmp_path_factory.mktemp("trained")
    (folder / "tiny.yaml").write_text(TWO_EPOCHS)
    done = clusterlab(*FIT, cwd=folder)
    assert done.returncode == 0, done.tail()
    return folder


@pytest.fixture
def work(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "work")
    return tmp_path / "work"


def run_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "runs" / "tiny").iterdir())


def one_line(finished) -> str:
    """The one `clusterlab: error` line of a failed command (exit code 1, no traceback)."""
    lines = [line for line in finished.stderr.splitlines() if line.startswith("clusterlab")]
    assert finished.returncode == 1 and len(lines) == 1, finished.tail()
    assert "Traceback" not in finished.stderr, finished.tail()
    return lines[0]


def fit_here(caplog, *args: str) -> str:
    """`clusterlab fit --config tiny.yaml *args` in this process (the cwd is the work folder); what it
    logged (Lightning's info lines, which a process prints on stderr)."""
    from clusterlab.cli import main

    caplog.clear()
    # (At INFO whatever an earlier test in this process set: the folder command quiets Lightning.)
    with caplog.at_level("INFO", logger="pytorch_lightning"):
        main([*FIT, *args])
    return caplog.text


def test_a_failed_start_leaves_no_directory_and_ckpt_path_last_continues_the_run_with_work(
    work, capsys, caplog, monkeypatch
):
    monkeypatch.chdir(work)
    [run] = before = run_dirs(work)
    # Refused while the data loads (inside trainer.fit): too large a batch.
    assert "lower --data.batch_size" in user_error(capsys, *FIT, "--data.batch_size", "100000")
    assert run_dirs(work) == before
    # Refused while the classes are built (LightningCLI's instantiation): the views' own check.
    mean_only = ["--model.init_args.views.init_args.mean", "[0.5]"]
    assert "give both mean and std, or neither" in user_error(capsys, *FIT, *mean_only)
    assert run_dirs(work) == before
    # Stopped at the first training step, after the loggers had written their files.
    diverged = [
        "--model.init_args.optimizer",
        "torch.optim.SGD",
        "--model.init_args.optimizer.init_args.lr",
        "1e30",
    ]
    assert "diverged" in user_error(capsys, *FIT, *diverged)
    assert run_dirs(work) == before
    assert not list((work / "runs").glob("tiny/.*"))  # nothing half removed left behind

    said = fit_here(caplog, "--ckpt_path", "last", "--trainer.max_epochs", "4", *RECORD_START)
    run_dir = work / "runs" / "tiny" / run
    assert f"continuing {run_dir.relative_to(work)} from its checkpoint" in said
    assert (work / "start.txt").read_text() == "2 6"  # from the checkpoint of epoch 1, not from scratch
    assert run_dirs(work) == before
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12


def test_ckpt_path_last_passes_over_a_newer_run_without_a_checkpoint(work, caplog, monkeypatch):
    monkeypatch.chdir(work)
    [run] = run_dirs(work)
    # Newer starts killed before their first checkpoint: a config alone, or with the loggers' files.
    for newer, files in (("29991231-235958-seed3", []), ("29991231-235959-seed3", ["hparams.yaml"])):
        (work / "runs" / "tiny" / newer / "checkpoints").mkdir(parents=True)
        for name in ["config.yaml", *files]:
            shutil.copy(work / "runs" / "tiny" / run / name, work / "runs" / "tiny" / newer / name)
    left = {p: p.read_bytes() for p in (work / "runs" / "tiny").glob("2999*/*") if p.is_file()}

    logged = fit_here(caplog, "--ckpt_path", "last", "--trainer.max_epochs", "3", *RECORD_START)
    [said] = [line for line in logged.splitlines() if "--ckpt_path last" in line]
    assert f"continuing {Path('runs', 'tiny', run)} from its checkpoint" in said
    assert "passed over the newer 29991231-235958-seed3, 29991231-235959-seed3" in said
    assert (work / "start.txt").read_text() == "2 6"
    assert (work / "runs" / "tiny" / run / "metrics.json").is_file()
    # The passed-over directories are not this run's: they stay as they were.
    assert {p: p.read_bytes() for p in (work / "runs" / "tiny").glob("2999*/*") if p.is_file()} == left
    assert not any((work / "runs" / "tiny" / "29991231-235959-seed3" / "checkpoints").iterdir())


def test_a_run_stopped_before_its_first_checkpoint_keeps_its_directory_and_starts_again_in_it(tmp_path):
    from tests.cli.test_lifecycle import start

    (tmp_path / "tiny.yaml").write_text(TWO_EPOCHS)
    ctrl_c = [
        "--trainer.callbacks+=tests.helpers.KillAt",
        "--trainer.callbacks.epoch=0",
        "--trainer.callbacks.batch=1",
        "--trainer.callbacks.signal_name=SIGINT",
    ]
    process = start(tmp_path, *FIT, *ctrl_c)
    assert process.wait(timeout=120) == 1
    assert "keeps no checkpoint yet" in process.stderr.read()
    [run] = run_dirs(tmp_path)  # a stop is not a failure: the directory stays, without a checkpoint
    assert not (tmp_path / "runs" / "tiny" / run / "checkpoints" / "last.ckpt").exists()

    again = clusterlab(*FIT, "--ckpt_path", "last", *RECORD_START, cwd=tmp_path)
    assert again.returncode == 0, again.tail()
    assert "was stopped before its first checkpoint; starting it again" in again.stderr
    assert (tmp_path / "start.txt").read_text() == "0 0"
    assert run_dirs(tmp_path) == [run]
    assert (tmp_path / "runs" / "tiny" / run / "metrics.json").is_file()


def epoch_rows(run_dir: Path) -> list[int]:
    """The epochs of metrics.csv's epoch-end rows (train/loss_epoch), in file order."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f) if row.get("train/loss_epoch")]


def test_a_kill_right_after_an_epochs_checkpoint_keeps_the_epochs_row_once(tmp_path):
    """Lightning writes the checkpoint that ends an epoch before it logs the epoch's reduced values:
    a SIGKILL in between once lost the row for good, as the resumed run starts with the next epoch."""
    (tmp_path / "tiny.yaml").write_text(tiny_config(trainer={"max_epochs": 3}))
    kill = {"class_path": "tests.hostile.test_resume_inputs.KillAfterCheckpoint", "init_args": {"epoch": 1}}
    (tmp_path / "kill.yaml").write_text(tiny_config(trainer={"max_epochs": 3, "plugins": [kill]}))
    killed = clusterlab("fit", "--config", "kill.yaml", "--name", "tiny", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.tail()
    [run] = run_dirs(tmp_path)
    run_dir = tmp_path / "runs" / "tiny" / run
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert epoch_rows(run_dir) == [0, 1]  # on disk when the checkpoint of epoch 1 was

    resumed = clusterlab(*FIT, "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.tail()
    assert epoch_rows(run_dir) == [0, 1, 2]
