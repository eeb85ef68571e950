"""A run on N processes computes the same loss and gradients as one process with the whole batch."""

import copy
import functools
import json

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp

from clusterlab.data.datamodule import ClusterDataModule, ShardSampler
from clusterlab.data.views import Views
from clusterlab.methods import CC
from clusterlab.nn import SmallCNN
from tests.ddp_workers import RecordEvaluation, RecordFirstStep, cc_loss, loss_worker


def test_gathered_cc_loss_on_two_processes_equals_one_process(tmp_path):
    torch.manual_seed(0)
    inputs = [torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 5).softmax(1), torch.randn(8, 5).softmax(1)]
    mp.spawn(loss_worker, args=(2, str(tmp_path / "store"), inputs, str(tmp_path)), nprocs=2, join=True)

    whole = [x.clone().requires_grad_(True) for x in inputs]
    loss = cc_loss(*whole)
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, result in enumerate(ranks):
        assert result["loss"] == pytest.approx(loss.item(), rel=1e-6)
        for local_grad, full in zip(result["grads"], whole):
            # Each process's rows get every process's gradient (summed); DDP's averaging over
            # the 2 processes then gives the single-process gradient.
            torch.testing.assert_close(local_grad / 2, full.grad[r * 4 : (r + 1) * 4], rtol=1e-5, atol=1e-7)


def _cc_model() -> CC:
    torch.manual_seed(0)
    # GroupNorm: batch statistics would differ per process on CPU, where torch has no
    # SyncBatchNorm (on GPUs, --trainer.sync_batchnorm true makes BatchNorm global too).
    backbone = SmallCNN(1, widths=(8, 16), downsample=(False, True), norm="group")
    return CC(10, backbone, Views(), optimizer=functools.partial(torch.optim.SGD, lr=0.1))


def _trainer(devices: int, callback: pl.Callback, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=[callback], **kwargs)  # fmt: skip


def test_cc_training_step_on_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    pl.seed_everything(0)
    model = _cc_model()
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    single_out.mkdir(), ddp_out.mkdir()

    _trainer(2, RecordFirstStep(str(ddp_out)), max_steps=1, limit_val_batches=0).fit(
        copy.deepcopy(model), ClusterDataModule("digits", batch_size=32))
    _trainer(1, RecordFirstStep(str(single_out)), max_steps=1, limit_val_batches=0).fit(
        copy.deepcopy(model), ClusterDataModule("digits", batch_size=64))

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
    _trainer(2, RecordEvaluation(str(tmp_path))).validate(copy.deepcopy(model), ClusterDataModule("digits", eval_batch_size=100))
    single = RecordEvaluation(str(tmp_path / "single"))
    (tmp_path / "single").mkdir()
    _trainer(1, single).validate(copy.deepcopy(model), ClusterDataModule("digits", eval_batch_size=100))


    expected = json.loads((tmp_path / "single" / "eval_rank0.json").read_text())
    for rank in range(2):
        got = json.loads((tmp_path / f"eval_rank{rank}.json").read_text())
        for key in ("acc", "nmi", "ari"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6)


def test_shard_sampler_covers_every_sample_exactly_once():
    data = list(range(11))
    shards = [list(ShardSampler(data, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == data
    assert [len(ShardSampler(data, 3, r)) for r in range(3)] == [len(s) for s in shards]
