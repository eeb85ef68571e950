"""CC: the training step on N processes equals one process with the whole batch; evaluation shards."""

import copy
import functools
import json

import pytest
import pytorch_lightning as pl
import torch

from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.views import Views
from clusterlab.methods import CC
from clusterlab.nn import SmallCNN
from tests.ddp_workers import RecordEvaluation, RecordFirstStep
from tests.helpers import trainer


def _cc_model() -> CC:
    torch.manual_seed(0)
    # GroupNorm: batch statistics would differ per process on CPU, where torch has no
    # SyncBatchNorm (on GPUs, --trainer.sync_batchnorm true makes BatchNorm global too).
    backbone = SmallCNN(1, widths=(8, 16), downsample=(False, True), norm="group")
    return CC(10, backbone, Views(), optimizer=functools.partial(torch.optim.SGD, lr=0.1))


def test_cc_training_step_on_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    pl.seed_everything(0)
    model = _cc_model()
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    single_out.mkdir(), ddp_out.mkdir()

    trainer(2, RecordFirstStep(str(ddp_out)), max_steps=1, limit_val_batches=0).fit(
        copy.deepcopy(model), ClusterDataModule("digits", batch_size=32)
    )
    trainer(1, RecordFirstStep(str(single_out)), max_steps=1, limit_val_batches=0).fit(
        copy.deepcopy(model), ClusterDataModule("digits", batch_size=64)
    )

    single = torch.load(single_out / "rank0.pt")
    ranks = [torch.load(ddp_out / f"rank{r}.pt") for r in range(2)]
    # The two processes' batches together are exactly the single process's batch.
    assert sorted(torch.cat([r["batch"] for r in ranks]).tolist()) == sorted(single["batch"].tolist())
    for result in ranks:
        assert float(result["loss"]) == pytest.approx(float(single["loss"]), rel=1e-5)
        assert result["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_evaluation_on_two_processes_counts_every_sample_once(tmp_path):
    pl.seed_everything(0)
    model = _cc_model()
    trainer(2, RecordEvaluation(str(tmp_path))).validate(
        copy.deepcopy(model), ClusterDataModule("digits", eval_batch_size=100)
    )
    single = RecordEvaluation(str(tmp_path / "single"))
    (tmp_path / "single").mkdir()
    trainer(1, single).validate(copy.deepcopy(model), ClusterDataModule("digits", eval_batch_size=100))

    expected = json.loads((tmp_path / "single" / "eval_rank0.json").read_text())
    for rank in range(2):
        got = json.loads((tmp_path / f"eval_rank{rank}.json").read_text())
        for key in ("acc", "nmi", "ari"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6)
