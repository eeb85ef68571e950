"""`fit --ckpt_path last` continues a killed run to the same weights as an uninterrupted run."""

import os
import subprocess
import sys

import torch

from tests.helpers import REPO, TINY_CC


def clusterlab(*args, cwd):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "clusterlab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def state(run_dir):
    return torch.load(next(run_dir.glob("*/checkpoints/last.ckpt")), weights_only=False)


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_CC)
    kill = ["--trainer.callbacks+=tests.helpers.KillAt", "--trainer.callbacks.epoch=2", "--trainer.callbacks.batch=1"]

    whole = clusterlab("fit", "--config", "tiny.yaml", "--name", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = clusterlab("fit", "--config", "tiny.yaml", "--name", "killed", *kill, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL, mid-epoch 2
    assert state(tmp_path / "runs" / "killed")["epoch"] == 1  # the last checkpoint is epoch 1's

    resumed = clusterlab("fit", "--config", "tiny.yaml", "--name", "killed", "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(list((tmp_path / "runs" / "killed").iterdir())) == 1  # it continued in the same run directory

    expected, got = state(tmp_path / "runs" / "whole"), state(tmp_path / "runs" / "killed")
    assert got["epoch"] == expected["epoch"] == 3 and got["global_step"] == expected["global_step"] == 12
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][name], tensor), name
    run_dir = next((tmp_path / "runs" / "killed").iterdir())
    assert (run_dir / "metrics.json").exists()
    # The log of the killed part is kept: metrics.csv still has the rows of epochs 0 and 1.
    epochs = {row.split(",")[0] for row in (run_dir / "metrics.csv").read_text().splitlines()[1:]}
    assert {"0", "1", "2", "3"} <= epochs
