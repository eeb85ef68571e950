"""`fit --ckpt_path last` continues a run killed mid-epoch to the weights of an uninterrupted run,
for every method.

CC's and SCL's run in the default `make test`; NNM's (a pretext run first) and DCCM's two
(45-70 s each on 2 cores) are marked slow to keep the default run under 8 minutes, and run with
`make test-slow`. The mechanism they share (reseeding per step, the loader's skip, the checkpoint
inside an epoch) is tested by CC's run here and by tests/cli/test_lifecycle.py."""

import json

import pytest
import torch

from tests.helpers import (
    TINY_CC,
    TINY_DCCM,
    TINY_NNM,
    TINY_SCL,
    TINY_SIMCLR,
    TINY_TEMI,
    kill_and_resume,
)
from tests.launch import clusterlab


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_CC)
    kill_and_resume(tmp_path, "tiny.yaml")  # same epoch, step and weights as the uninterrupted run
    assert len(list((tmp_path / "runs" / "killed").iterdir())) == 1  # it continued in the same run directory
    run_dir = next((tmp_path / "runs" / "killed").iterdir())
    assert (run_dir / "metrics.json").exists()
    # The log of the killed part is kept: metrics.csv still has the rows of epochs 0 and 1.
    epochs = {row.split(",")[0] for row in (run_dir / "metrics.csv").read_text().splitlines()[1:]}
    assert {"0", "1", "2", "3"} <= epochs


@pytest.mark.slow
def test_killed_and_resumed_nnm_run_continues_with_the_same_global_table(tmp_path):
    (tmp_path / "tiny_simclr.yaml").write_text(TINY_SIMCLR)
    (tmp_path / "tiny_nnm.yaml").write_text(TINY_NNM)
    pretext = clusterlab("fit", "--config", "tiny_simclr.yaml", cwd=tmp_path)
    assert pretext.returncode == 0, pretext.tail()
    expected, stopped, got = kill_and_resume(tmp_path, "tiny_nnm.yaml")
    assert stopped["callbacks"]["GlobalNeighbors"]["epoch"] == 1  # epoch 1's table was saved
    table, resumed_table = expected["callbacks"]["GlobalNeighbors"], got["callbacks"]["GlobalNeighbors"]
    assert table["epoch"] == resumed_table["epoch"] == 3
    assert torch.equal(table["table"], resumed_table["table"])
    report = json.loads(next((tmp_path / "runs" / "killed").glob("*/metrics.json")).read_text())
    assert "neighbor_agreement" in report["diagnostics"]


@pytest.mark.slow  # a pretext run first, as NNM's
def test_killed_and_resumed_temi_run_continues_with_the_same_teacher_and_prior(tmp_path):
    (tmp_path / "tiny_simclr.yaml").write_text(TINY_SIMCLR)
    (tmp_path / "tiny_temi.yaml").write_text(TINY_TEMI)
    pretext = clusterlab("fit", "--config", "tiny_simclr.yaml", cwd=tmp_path)
    assert pretext.returncode == 0, pretext.tail()
    expected, stopped, got = kill_and_resume(tmp_path, "tiny_temi.yaml")  # every tensor equal
    assert not torch.equal(stopped["state_dict"]["prior"], expected["state_dict"]["prior"])  # it moved on
    assert "momentum_encoder.cluster_head.directions" in got["state_dict"]


# SCL on digits, small enough for a test: 8/16-channel CNN, 3 batches of 64 per epoch, queues that
# wrap around within an epoch.


@pytest.mark.slow  # method-specific resume, as NNM's and DCCM's (the generic one stays in make test)
def test_killed_and_resumed_scl_run_continues_with_the_same_state(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_SCL)
    expected, saved, got = kill_and_resume(tmp_path, "tiny.yaml")  # killed mid-epoch 2, after its refresh
    # The checkpoint of epoch 1 already held the state SCL carries between epochs.
    assert (
        int(saved["state_dict"]["sample_table.epoch"]) == 1
        and saved["state_dict"]["sample_table.changes"].any()
    )
    assert (saved["state_dict"]["semantic_memory.clustering.index"] >= 0).any()
    names = set(expected["state_dict"])
    for part in ("backbone.", "momentum_encoder.", "semantic_memory.", "sample_table.", "cluster_head."):
        assert any(n.startswith(part) for n in names), part
    assert int(got["state_dict"]["sample_table.epoch"]) == 3


@pytest.mark.slow
def test_killed_and_resumed_dccm_run_ends_with_the_same_weights(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_DCCM)
    expected, _, _ = kill_and_resume(tmp_path, "tiny.yaml")
    assert any(name.startswith("discriminators.") for name in expected["state_dict"])
    # The mutual information had random negatives to draw: the resumed run drew the same ones.
    log = next((tmp_path / "runs" / "whole").glob("*/metrics.csv")).read_text().splitlines()
    column = log[0].split(",").index("train/graph_positives")
    assert any(0 < float(row.split(",")[column]) < 1 for row in log[1:] if row.split(",")[column])


@pytest.mark.slow
def test_a_dccm_run_killed_inside_a_chunk_resumes_with_the_chunks_targets(tmp_path):
    """The authors' chunked schedule: a checkpoint inside a chunk (here after every batch) holds
    the targets the chunk started with; the resumed run uses them and ends as the whole run."""
    from tests.cli.test_lifecycle import FIT, assert_same_weights, state

    (tmp_path / "tiny.yaml").write_text(TINY_DCCM)
    chunked = [
        "--model.init_args.chunk_size",
        "128",
        "--model.init_args.chunk_repeats",
        "2",
        "--checkpoint_every_minutes",
        "0.000001",
    ]
    whole = clusterlab(*FIT, "--name", "whole", *chunked, cwd=tmp_path)
    assert whole.returncode == 0, whole.tail()
    kill = [
        "--trainer.callbacks+=tests.helpers.KillAt",
        "--trainer.callbacks.epoch=2",
        "--trainer.callbacks.batch=2",
    ]
    killed = clusterlab(*FIT, "--name", "killed", *chunked, *kill, cwd=tmp_path)
    assert killed.returncode == -9, killed.tail()
    at_kill = state(tmp_path / "runs" / "killed")
    assert (at_kill["epoch"], at_kill["global_step"]) == (2, 8) and at_kill["state_dict"][
        "chunk_probs"
    ].sum() > 0
    resumed = clusterlab(*FIT, "--name", "killed", "--ckpt_path", "last", *chunked, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.tail()
    assert_same_weights(state(tmp_path / "runs" / "whole"), state(tmp_path / "runs" / "killed"))
