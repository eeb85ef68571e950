"""CC: the training step on N processes equals one process with the whole batch; evaluation shards."""

import copy
import functools
import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.views import Views
from clusterlab.methods import CC
from clusterlab.neighbors import kmeans
from clusterlab.nn import SmallCNN
from clusterlab.seeding import derive_seed
from tests.ddp_workers import RecordEvaluation, RecordFirstStep
from tests.helpers import assert_first_steps_equal, trainer


def _cc_model(num_heads: int = 1) -> CC:
    torch.manual_seed(0)
    # GroupNorm: batch statistics would differ per process on CPU, where torch has no
    # SyncBatchNorm (on GPUs, --trainer.sync_batchnorm true makes BatchNorm global too).
    backbone = SmallCNN(1, widths=(8, 16), downsample=(False, True), norm="group")
    return CC(
        10, backbone, Views(), num_heads=num_heads, optimizer=functools.partial(torch.optim.SGD, lr=0.1)
    )


@pytest.mark.parametrize("num_heads", [1, pytest.param(3, marks=pytest.mark.slow)])  # 3 heads: make test-slow
def test_cc_training_step_on_two_processes_equals_one_process_with_the_whole_batch(num_heads, tmp_path):
    pl.seed_everything(0)
    model = _cc_model(num_heads)
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    single_out.mkdir(), ddp_out.mkdir()

    trainer(2, RecordFirstStep(str(ddp_out)), max_steps=1, limit_val_batches=0).fit(
        copy.deepcopy(model), ClusterDataModule("digits", batch_size=32)
    )
    trainer(1, RecordFirstStep(str(single_out)), max_steps=1, limit_val_batches=0).fit(
        copy.deepcopy(model), ClusterDataModule("digits", batch_size=64)
    )

    assert_first_steps_equal(single_out, ddp_out)


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


class HeadLosses(pl.Callback):
    """What each step added to every head's loss (cluster loss + entropy term)."""

    def __init__(self) -> None:
        self.recorded = []

    def on_train_batch_start(self, trainer, model, batch, batch_idx) -> None:
        self.before = model.head_loss_sum.clone()

    def on_train_batch_end(self, trainer, model, outputs, batch, batch_idx) -> None:
        self.recorded.append(model.head_loss_sum - self.before)


def test_several_heads_train_side_by_side_and_the_lowest_cluster_loss_is_reported():
    pl.seed_everything(0)
    model = _cc_model(num_heads=3)
    model.hparams.use_instance_loss = False  # then the loss is the mean of the heads' losses
    record = HeadLosses()
    losses = []

    class Loss(pl.Callback):
        def on_train_batch_end(self, trainer, model, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer(1, [record, Loss()], max_epochs=2, limit_train_batches=3).fit(
        model, ClusterDataModule("digits", batch_size=64)
    )
    for step, loss in zip(record.recorded, losses):
        assert float(step.mean()) == pytest.approx(loss, rel=1e-5)  # L_clu of Eq. 6 is the heads' mean
        assert len(set(step.tolist())) == 3  # three heads, three different losses
    assert int(model.selected_head) == int(model.head_loss.argmin())  # no label chooses the head
    assert len(model.eval_results["heads"]) == 3
    report = model.eval_results
    assert report["acc"] == report["heads"][report["selected_head"]]["acc"]


def test_the_head_starts_from_spherical_kmeans_of_the_instance_features_at_its_epoch():
    """head_init_epoch: at that epoch's start the head's argmax is k-means on z (no label)."""
    pl.seed_everything(0)
    model = _cc_model()
    model.hparams.head_init_epoch = 1
    seen = {}

    class AtFirstBatch(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if trainer.current_epoch == 1 and batch_idx == 0:
                images = trainer.datamodule.train_set.images
                with torch.no_grad():
                    module.eval()
                    x = module.plain(images)
                    seen["head"] = module.cluster_head(module.backbone(x))[0].argmax(-1)
                    seen["z"] = module.instance_features(x).float()
                    module.train()

    trainer(1, AtFirstBatch(), max_epochs=2, limit_train_batches=2, limit_val_batches=0).fit(
        model, ClusterDataModule("digits", batch_size=64)
    )
    assignments, _ = kmeans(F.normalize(seen["z"], dim=1), 10, seed=derive_seed(0, 7) % 2**31)
    assert (seen["head"] == assignments.to(seen["head"])).float().mean() > 0.99
    assert len(seen["head"].unique()) == 10


def test_head_init_temperature_divides_the_kmeans_heads_logits():
    """head_init_temperature T: the k-means start's logits are cos(z, c_k) / T (up to |z|), so halving
    T doubles the output layer and leaves the hidden layer and the argmax as they were."""
    weights = []  # per temperature: the hidden layer, the output layer's weight and bias
    for temperature in (0.1, 0.05):
        pl.seed_everything(0)
        model = _cc_model()
        model.hparams.head_init_epoch, model.hparams.head_init_temperature = 0, temperature

        class AtFirstBatch(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
                head = module.cluster_head.heads[0]
                weights.append([head[0].weight.clone(), head[2].weight.clone(), head[2].bias.clone()])

        trainer(1, AtFirstBatch(), max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
            model, ClusterDataModule("digits", batch_size=64)
        )
    (hidden, out, bias), (hidden_half, out_half, bias_half) = weights
    torch.testing.assert_close(hidden_half, hidden)
    torch.testing.assert_close(out_half, 2 * out)
    torch.testing.assert_close(bias_half, 2 * bias)
