"""clusterlab.runs: run directories (named, made exclusively, found again), checkpoints read
weights-only with one line naming a file that is not one, and the processes of one run agreeing
on rank 0's decision. (Through the CLI: tests/cli/test_lifecycle.py, tests/cli/test_launch.py,
tests/hostile/test_foreign_code.py for planted pickles, tests/hostile/test_resume_inputs.py.)"""

from __future__ import annotations

import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from clusterlab import runs
from clusterlab.errors import CheckpointError, UserError
from clusterlab.runs import (
    Launch,
    agree,
    describe_checkpoint,
    detect_launch,
    fit_runs,
    load_checkpoint,
    make_run_dir,
    read_checkpoint,
    run_of_checkpoint,
    timestamp,
)
from tests.helpers import fit_digits, tiny_cnn

# -- run directories ----------------------------------------------------------------------------


def test_a_taken_run_directory_name_gets_the_next_free_suffix(tmp_path):
    parent, stem = tmp_path / "runs" / "tiny", "20240101-120000-seed3"
    assert make_run_dir(parent, stem) == parent / stem  # runs/tiny/ made on the way
    (parent / f"{stem}-3").write_text("a file of that name: taken too")
    assert make_run_dir(parent, stem) == parent / f"{stem}-2"
    assert make_run_dir(parent, stem) == parent / f"{stem}-4"
    assert (parent / f"{stem}-3").read_text() == "a file of that name: taken too"
    assert all(not any(p.iterdir()) for p in parent.iterdir() if p.is_dir())  # each one new and empty


def test_runs_started_in_the_same_second_never_share_a_directory(tmp_path):
    """Many processes (here threads) making the same name at once: each gets a directory of its own."""
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: make_run_dir(tmp_path, "20240101-120000-seed3"), range(40)))
    assert len(set(made)) == 40
    assert sorted(p.name for p in made) == sorted(p.name for p in tmp_path.iterdir())


def test_fit_runs_are_listed_oldest_first_of_one_seed_and_nothing_else(tmp_path):
    for name in (
        "20240101-120000-seed3-10",
        "20240101-120000-seed3",
        "20240101-120000-seed3-2",
        "20231231-235959-seed3",
        "20240101-120000-seed4",
        "20240102-000000-test-seed3",  # a stage's run of a checkpoint from elsewhere
        ".20240103-000000-seed3.failed-123",  # a failed start, on its way out
        "notes",
    ):
        (tmp_path / name).mkdir()
    (tmp_path / "20240104-000000-seed3").write_text("a file with a run's name")
    assert [p.name for p in fit_runs(tmp_path, seed=3)] == [
        "20231231-235959-seed3",
        "20240101-120000-seed3",
        "20240101-120000-seed3-2",
        "20240101-120000-seed3-10",  # by number: -10 after -2
    ]
    assert [p.name for p in fit_runs(tmp_path, seed=4)] == ["20240101-120000-seed4"]
    assert len(fit_runs(tmp_path)) == 5
    assert fit_runs(tmp_path / "no such name") == []
    # A fit's name as the CLI makes it, now: the newest.
    assert re.fullmatch(r"\d{8}-\d{6}", timestamp())
    made = make_run_dir(tmp_path, f"{timestamp()}-seed3")
    assert fit_runs(tmp_path, seed=3)[-1] == made


def test_the_run_of_a_checkpoint_is_the_run_directory_it_was_written_into(tmp_path):
    run = tmp_path / "runs" / "tiny" / "20240101-120000-seed3"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert run_of_checkpoint(checkpoint) == run and run_of_checkpoint(str(checkpoint)) == run
    assert run_of_checkpoint(tmp_path / "downloaded.ckpt") is None
    assert run_of_checkpoint(None) is None and run_of_checkpoint("") is None
    (run / "config.yaml").unlink()  # a checkpoints/ folder that is not a run's
    assert run_of_checkpoint(checkpoint) is None


# -- checkpoints --------------------------------------------------------------------------------


def test_a_checkpoint_is_read_weights_only_tensors_and_all(tmp_path):
    path = tmp_path / "last.ckpt"
    saved = {
        "state_dict": {"w": torch.arange(6.0).view(2, 3), "n": torch.tensor(4)},
        "epoch": 2,
        "global_step": 12,
        "optimizer_states": [{"state": {0: {"step": torch.tensor(12.0)}}, "param_groups": [{"lr": 0.1}]}],
        "clusterlab": {"method": "CC", "num_clusters": 10, "input_shape": [1, 8, 8]},
    }
    torch.save(saved, path)
    for mmap in (False, True):
        loaded = load_checkpoint(str(path), mmap=mmap)
        assert torch.equal(loaded["state_dict"]["w"], saved["state_dict"]["w"])
        assert loaded["optimizer_states"][0]["state"][0]["step"] == 12
        assert {k: v for k, v in loaded.items() if k not in ("state_dict", "optimizer_states")} == {
            k: v for k, v in saved.items() if k not in ("state_dict", "optimizer_states")
        }


def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line(tmp_path):
    def refused(path) -> str:
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path)
        assert "\n" not in str(error.value)
        return str(error.value)

    missing = tmp_path / "missing.ckpt"
    assert refused(missing) == f"checkpoint {missing} does not exist"
    text, empty = tmp_path / "notes.ckpt", tmp_path / "empty.ckpt"
    text.write_text("not a checkpoint\n")
    empty.write_bytes(b"")
    for path, size in ((text, 17), (empty, 0)):
        line = refused(path)
        assert line.startswith(f"cannot read checkpoint {path} ({size} bytes): "), line
        assert line.endswith("use another one (a run's checkpoints/last.ckpt).")
    for contents in ({"weights": torch.ones(2)}, [torch.ones(2)]):
        torch.save(contents, tmp_path / "other.pt")
        line = refused(tmp_path / "other.pt")
        assert line == f"{tmp_path / 'other.pt'} is not a Lightning checkpoint (no state_dict)"


def test_a_checkpoint_says_what_it_holds_without_its_weights(tmp_path):
    from clusterlab import __version__
    from clusterlab.data.views import SmallImageViews
    from clusterlab.methods import CC

    torch.manual_seed(0)
    trainer = fit_digits(CC(10, tiny_cnn(), SmallImageViews()), epochs=2)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    # Built in Python, the model keeps its modules as hyper-parameters: pickled objects, which a
    # weights-only read refuses (the CLI's models keep their config there instead).
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["hyper_parameters"]
    torch.save(checkpoint, path)
    meta = read_checkpoint(path)
    assert meta == {
        "method": "CC",
        "num_clusters": 10,
        "input_shape": [1, 8, 8],
        "epochs_trained": 2,
        "version": __version__,
        "path": str(path),
        "epoch": 2,
        "global_step": 4,
    }
    assert describe_checkpoint(meta) == "CC (10 clusters, 1x8x8, 2 epochs)"
    # Contents the caller has loaded already are not read again.
    gone = tmp_path / "gone.ckpt"
    assert read_checkpoint(gone, checkpoint) == {**meta, "path": str(gone)}
    assert describe_checkpoint({"method": "CC"}) == "CC"
    assert describe_checkpoint({"num_clusters": 3}) == "an unknown method (3 clusters)"
    assert describe_checkpoint({}) == "?"


# -- the processes of one run agree -------------------------------------------------------------


@pytest.fixture
def launch_env(monkeypatch):
    """The environment as it was before the test, with no decision of an earlier run in it."""
    for name in ("CLUSTERLAB_RUN", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_decides_and_those_lightning_starts_inherit_the_decision(launch_env):
    decided = []
    assert detect_launch() == Launch("single")
    assert agree(lambda: decided.append(0) or {"run_dir": "runs/a"}) == {"run_dir": "runs/a"}
    # A process that Lightning's launcher starts for --trainer.devices N: this environment, rank 1.
    launch_env.setenv("LOCAL_RANK", "1")
    assert detect_launch() == Launch("lightning", 1)
    assert agree(lambda: decided.append(1) or {"run_dir": "runs/b"}) == {"run_dir": "runs/a"}
    assert decided == [0]  # rank 0 alone decided


def test_rank_0s_user_error_is_every_process_s_error(launch_env):
    def refuse():
        raise UserError("--ckpt_path last: no run of this name to continue")

    with pytest.raises(UserError, match="no run of this name to continue"):
        agree(refuse, Launch("single"))
    with pytest.raises(UserError, match="no run of this name to continue"):
        agree(lambda: {"run_dir": "runs/a"}, Launch("lightning", 1))


def test_torchrun_ranks_receive_rank_0s_decision_and_a_restart_decides_again(launch_env):
    """Through a real TCPStore that rank 0 serves: ranks 1 and 2 wait for rank 0's decision; after a
    restart (torchrun's next attempt) a rank waits for the new decision, it never reads the old."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch_env.setenv("CLUSTERLAB_LAUNCH_TIMEOUT", "60")
    launch_env.setenv("TORCHELASTIC_RUN_ID", "job")
    launch_env.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "3")):
        launch_env.setenv(name, value)
    launch_env.setenv("MASTER_ADDR", "127.0.0.1")
    launch_env.setenv("MASTER_PORT", str(port))
    assert detect_launch() == Launch("torchrun", 1, "127.0.0.1", port, attempt="job.0")
    launch_env.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert detect_launch().attempt == "job.1"

    def rank(number: int, attempt: str, decision: dict) -> dict:
        return agree(lambda: decision, Launch("torchrun", number, "127.0.0.1", port, attempt=attempt))

    stores = len(runs._STORES)
    try:
        with ThreadPoolExecutor(2) as pool:
            others = [pool.submit(rank, n, "job.0", {"run_dir": f"decided by rank {n}"}) for n in (1, 2)]
            assert rank(0, "job.0", {"run_dir": "runs/a"}) == {"run_dir": "runs/a"}
            assert [f.result(timeout=60) for f in others] == [{"run_dir": "runs/a"}] * 2
            late = pool.submit(rank, 1, "job.1", {"run_dir": "decided by rank 1"})
            time.sleep(1.0)
            assert not late.done()  # waiting for the new attempt's rank 0
            assert rank(0, "job.1", {"run_dir": "runs/b"}) == {"run_dir": "runs/b"}
            assert late.result(timeout=60) == {"run_dir": "runs/b"}
    finally:
        del runs._STORES[stores:]  # the stores this test served: their ports closed again
