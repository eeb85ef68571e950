"""Multi-process runs through the CLI end, under every launcher, with one run directory.

Each test launches real processes (gloo on the CPU) with a timeout: a hang fails the test.
"""

import csv
import json

import pytest

from tests.helpers import TINY_DCCM, TINY_NNM, TINY_SCL, TINY_SIMCLR, tiny_config
from tests.launch import clusterlab, srun, torchrun

# CC with a batch-independent network (GroupNorm) and no random views: two processes with 32
# images each then compute exactly what one process computes with 64 (tests/test_distributed.py).
DDP_CC = tiny_config(
    "CC",
    trainer={"accelerator": "cpu", "max_epochs": 2},
    model={
        "backbone": {"init_args": {"in_channels": None, "norm": "group"}},
        "views": {"class_path": "clusterlab.data.views.Views"},
    },
    figures={"enabled": True, "embedding_points": 200},
)

TWO = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]


def only_run(root):
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run directory, found {[p.name for p in runs]}"
    return runs[0]


def assert_complete(run_dir, devices: int) -> dict:
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["devices"] == devices
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    assert {p.name for p in (run_dir / "figures").iterdir()} == {
        "confusion.png",
        "confident.png",
        "embedding.png",
    }
    return report


def test_torchrun_fit_and_predict_end_with_one_run_directory_and_the_one_process_acc(tmp_path):
    (tmp_path / "ddp_cc.yaml").write_text(DDP_CC)
    single = clusterlab("fit", "--config", "ddp_cc.yaml", "--name", "single", cwd=tmp_path)
    assert single.returncode == 0, single.tail()
    fitted = torchrun(
        "fit", "--config", "ddp_cc.yaml", "--name", "ddp", *TWO, "--data.batch_size", "32", cwd=tmp_path
    )
    assert fitted.returncode == 0, fitted.tail()

    run_dir = only_run(tmp_path / "runs" / "ddp")
    report = assert_complete(run_dir, devices=2)
    expected = json.loads((only_run(tmp_path / "runs" / "single") / "metrics.json").read_text())
    assert report["steps"] == expected["steps"] == 6
    # The same loss and gradients at every step (float sums in another order): the same clusters
    # up to a few near-ties out of 1,797 images.
    for key in ("acc", "nmi", "ari"):
        assert report[key] == pytest.approx(expected[key], abs=2e-3), key

    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    predicted = torchrun(
        "predict",
        "--config",
        str(run_dir / "config.yaml"),
        "--ckpt_path",
        str(run_dir / "checkpoints" / "last.ckpt"),
        cwd=tmp_path,
    )
    assert predicted.returncode == 0, predicted.tail()
    stages = [p for p in run_dir.iterdir() if p.name.startswith("predict-")]
    assert len(stages) == 1  # the predict's own directory, inside the run
    stage = stages[0]
    with open(stage / "assignments.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["index"]) for r in rows) == list(range(1797))  # every image once, from both ranks
    assert not list(stage.glob("assignments.rank*.csv"))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and stage not in p.parents} == before


@pytest.mark.slow  # torchrun and srun launches are tested in make test; this third launcher in make test-slow
def test_lightnings_own_launcher_ends_with_one_run_directory(tmp_path):
    (tmp_path / "ddp_cc.yaml").write_text(DDP_CC)
    fitted = clusterlab("fit", "--config", "ddp_cc.yaml", *TWO, "--data.batch_size", "32", cwd=tmp_path)
    assert fitted.returncode == 0, fitted.tail()
    assert_complete(only_run(tmp_path / "runs" / "ddp_cc"), devices=2)


def test_srun_tasks_agree_on_one_run_directory(tmp_path):
    """Two tasks as srun starts them (SLURM_PROCID, SLURM_NTASKS, ...): Lightning's SLURM environment."""
    (tmp_path / "ddp_cc.yaml").write_text(DDP_CC)
    fitted = srun("fit", "--config", "ddp_cc.yaml", *TWO, "--data.batch_size", "32", cwd=tmp_path)
    assert fitted.returncode == 0, fitted.tail()
    report = assert_complete(only_run(tmp_path / "runs" / "ddp_cc"), devices=2)
    assert report["steps"] == 6


@pytest.mark.slow  # 30 s; the slow every-stage test covers NNM under torchrun too (make test under 8 min)
def test_torchrun_nnm_fit_with_mining_and_global_neighbours_ends(tmp_path):
    (tmp_path / "tiny_simclr.yaml").write_text(TINY_SIMCLR)
    (tmp_path / "tiny_nnm.yaml").write_text(TINY_NNM)
    pretext = clusterlab("fit", "--config", "tiny_simclr.yaml", cwd=tmp_path)
    assert pretext.returncode == 0, pretext.tail()
    fitted = torchrun(
        "fit",
        "--config",
        "tiny_nnm.yaml",
        *TWO,
        "--trainer.accelerator",
        "cpu",
        "--data.batch_size",
        "32",
        "--trainer.max_epochs",
        "2",
        cwd=tmp_path,
    )
    assert fitted.returncode == 0, fitted.tail()
    run_dir = only_run(tmp_path / "runs" / "tiny_nnm")
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["devices"] == 2 and report["epochs"] == 2 and 0 < report["acc"] <= 1


def _method_config(method: str, tmp_path) -> str:
    from tests.helpers import TINY_CC

    if method == "nnm":
        (tmp_path / "tiny_simclr.yaml").write_text(TINY_SIMCLR)
        pretext = clusterlab("fit", "--config", "tiny_simclr.yaml", cwd=tmp_path)
        assert pretext.returncode == 0, pretext.tail()
    text = {"cc": TINY_CC, "nnm": TINY_NNM, "scl": TINY_SCL, "dccm": TINY_DCCM}[method]
    (tmp_path / f"{method}.yaml").write_text(text)
    return f"{method}.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cc", "nnm", "scl", "dccm"])
def test_every_stage_of_every_method_ends_under_torchrun(method, tmp_path):
    """fit (with SCL's memory refresh, NNM's mining and global neighbours), then validate, test and
    predict of its checkpoint, each on 2 processes: every command ends, with exit code 0."""
    config = _method_config(method, tmp_path)
    fitted = torchrun(
        "fit",
        "--config",
        config,
        *TWO,
        "--trainer.accelerator",
        "cpu",
        "--data.batch_size",
        "32",
        "--trainer.max_epochs",
        "2",
        cwd=tmp_path,
    )
    assert fitted.returncode == 0, fitted.tail()
    run_dir = only_run(tmp_path / "runs" / method)
    assert_complete(run_dir, devices=2)
    for stage in ("validate", "test", "predict"):
        done = torchrun(
            stage,
            "--config",
            str(run_dir / "config.yaml"),
            "--ckpt_path",
            str(run_dir / "checkpoints" / "last.ckpt"),
            cwd=tmp_path,
        )
        assert done.returncode == 0, f"{stage}: {done.tail()}"
        [stage_dir] = [p for p in run_dir.iterdir() if p.name.startswith(f"{stage}-")]
        assert (stage_dir / ("assignments.csv" if stage == "predict" else "metrics.json")).is_file()


def test_the_sbatch_script_parses_and_passes_slurms_layout_to_the_trainer():
    import subprocess
    from pathlib import Path

    from tests.launch import REPO

    script = Path(REPO, "experiments", "slurm", "fit.sbatch")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for option in (
        '--trainer.num_nodes "$SLURM_NNODES"',
        '--trainer.devices "$SLURM_NTASKS_PER_NODE"',
        "--trainer.strategy ddp",
        "--ckpt_path last",
        "#SBATCH --requeue",
    ):
        assert option in text, option
