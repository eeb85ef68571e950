"""Host syncs: a training step must not make the GPU wait for the host (clusterlab.syncs).

Counted on the CPU, where `HostSyncCounter` sees the ops that would wait on a GPU, over steady
training steps of each digits config (its own views, losses, callbacks and optimizer).
"""

from pathlib import Path

import kornia
import pytest
import pytorch_lightning as pl
import torch

from clusterlab.cli import ClusterLabCLI
from clusterlab.errors import DivergenceError
from clusterlab.methods import CC
from clusterlab.nn import SmallCNN
from clusterlab.syncs import CountTrainingSyncs, HostSyncCounter
from tests.helpers import REPO, save_pretext

# The most syncs a steady training step may make, per digits config. Each one left is named where
# it is made (none is left at present).
ALLOWED = {"cc": 0, "simclr": 0, "nnm": 2, "scl": 2, "dccm": 2}


def fit_counting(model, datamodule, counter: pl.Callback, **trainer_args) -> pl.Trainer:
    trainer = pl.Trainer(
        **{
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "limit_train_batches": 4,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,  # it reads the logged loss every step
            "enable_model_summary": False,
            "log_every_n_steps": 4,
            "callbacks": [counter],
            **trainer_args,
        }
    )
    trainer.fit(model, datamodule)
    return trainer


@pytest.mark.parametrize("method", list(ALLOWED))
def test_a_steady_training_step_makes_no_host_sync(method, in_tmp):
    """Epoch 1 of 2 (NNM's global neighbours and SCL's refreshed labels in use), steps 5 and 6:
    not the first steps, not an epoch's last (epoch-level work), not a logging step (4 and 8)."""
    extra = []
    if method == "nnm":
        simclr = str(Path(REPO, "experiments/simclr_digits.yaml"))
        pretext = ClusterLabCLI(args=["--config", simclr], run=False)
        extra = ["--model.init_args.pretext_checkpoint", save_pretext(pretext.model, in_tmp / "pretext.ckpt")]
    if method == "scl":  # a 2-epoch count: one restart (the config's 3 need a multiple of 3 epochs)
        extra = ["--model.init_args.restarts", "1"]
    config = Path(REPO, "experiments", f"{method}_digits.yaml")
    cli = ClusterLabCLI(args=["--config", str(config), "--data.batch_size", "32", *extra], run=False)
    counter = CountTrainingSyncs(warmup=5)
    fit_counting(cli.model, cli.datamodule, counter)
    assert counter.steps == 2
    assert counter.counter.total <= ALLOWED[method] * counter.steps, f"{method}: {counter.summary()}"


def test_the_counter_names_the_ops_that_wait_and_where_they_are_made():
    x = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        x.sum().item()  # a number to the host
        _ = x[x > 2]  # a boolean mask: nonzero first
        x.nonzero()
        torch.bincount(x.long())
        x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]))  # the output size from the repeats
        if x.any():
            pass
    assert syncs.by_op() == {
        "_local_scalar_dense": 2,
        "index (bool mask)": 1,
        "nonzero": 1,
        "bincount": 1,
        "repeat_interleave": 1,
    }
    assert all(where.startswith("tests/test_syncs.py:") for _, where in syncs.counts)
    with HostSyncCounter() as syncs:  # fixed sizes, all on the device
        x[torch.tensor([0, 2])]
        torch.where(x > 2, x, 0.0)
        torch.nonzero_static(x, size=3)
        x.repeat_interleave(2)
        x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]), output_size=7)
        x.masked_fill(x > 2, 0.0)
    assert syncs.total == 0, syncs.summary()


def test_adams_step_counters_on_the_host_are_not_counted():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight])
    weight.sum().backward()
    with HostSyncCounter() as syncs:
        optimizer.step()
    assert syncs.total == 0, syncs.summary()


def test_kornias_argument_checks_are_not_counted_for_they_are_device_asserts_on_a_gpu():
    images, factor = torch.rand(4, 3, 8, 8), torch.full((4,), 0.5)
    with HostSyncCounter() as syncs:
        kornia.enhance.adjust_contrast(images, factor)  # _check_async((factor >= 0).all()) on 0.9.2
        kornia.enhance.adjust_gamma(images, factor)
    assert syncs.total == 0, syncs.summary()
    with HostSyncCounter() as syncs:  # the same read outside kornia's check is one
        bool((factor >= 0).all())
    assert syncs.total == 1, syncs.summary()


class BreakAt(pl.Callback):
    """Makes the weights non-finite before step `step`, and records the last step started."""

    def __init__(self, step: int) -> None:
        self.step, self.last = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.last = trainer.global_step
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.backbone.net[0].weight.fill_(float("nan"))


def test_the_divergence_guard_reads_when_lightning_logs_and_names_the_first_bad_step(in_tmp):
    from clusterlab.data.datamodule import ClusterDataModule
    from clusterlab.data.views import Views

    torch.manual_seed(0)
    model = CC(10, SmallCNN(1, (8, 16), (False, True)), Views())
    data = ClusterDataModule(dataset="digits", batch_size=32)
    breaker = BreakAt(1)
    expected = r"non-finite loss at epoch 0, step 1 \(lr 0.001\): instance = nan"
    with pytest.raises(DivergenceError, match=expected):
        fit_counting(model, data, breaker, max_epochs=1, limit_train_batches=10)
    assert breaker.last == 3  # read with the values Lightning logs at step 4 (log_every_n_steps 4)
