"""SimCLR, NNM's pretext: k-means evaluation, the kNN monitor, MoCo's queue, NT-Xent on 2 processes."""

import copy
import functools

import pytest
import pytorch_lightning as pl
import torch

from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.sources import Digits
from clusterlab.data.views import SmallImageViews, Views
from clusterlab.methods import CC, SimCLR
from tests.ddp_workers import RecordFirstStep
from tests.helpers import assert_first_steps_equal, tiny_cnn, trainer


def test_simclr_reports_kmeans_clusters_of_its_features_and_the_knn_agreement():
    pl.seed_everything(0)
    model = SimCLR(10, tiny_cnn(), SmallImageViews())
    trainer(max_epochs=1, limit_train_batches=3).fit(model, ClusterDataModule("digits", batch_size=128))
    assert 0.15 < model.eval_results["acc"] <= 1  # k-means on the features, not chance
    assert 0.3 < model.diagnostics["knn_agreement"] <= 1
    assert model.cluster_head.centroids.abs().sum() > 0  # kept for online prediction
    probs = model.predict_proba(Digits().load("train+test").images[:1])
    assert probs.shape == (1, 1, 10) and torch.allclose(probs.sum(-1), torch.ones(1, 1))


def test_knn_monitor_reports_nothing_without_labels():
    model = SimCLR(10, tiny_cnn(), Views())
    model.knn_monitor("val", torch.randn(30, 8), torch.full((30,), -1))
    assert "knn_agreement" not in model.diagnostics


def test_cc_ich_only_still_clusters_by_kmeans_through_the_base_class():
    pl.seed_everything(0)
    model = CC(10, tiny_cnn(), Views(), use_cluster_loss=False, use_cluster_entropy=False)
    trainer().validate(model, ClusterDataModule("digits"))
    assert model.eval_results["acc"] > 0.15 and model.cluster_head.centroids.abs().sum() > 0


def test_moco_enqueues_the_gathered_keys_of_every_step():
    pl.seed_everything(0)
    model = SimCLR(10, tiny_cnn(), SmallImageViews(), queue_size=200)
    before = model.queue.keys[0].clone()
    trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(
        model, ClusterDataModule("digits", batch_size=64)
    )
    assert int(model.queue.pointer) == 128
    keys = model.queue.keys[0]
    assert not torch.allclose(keys[:128], before[:128]) and torch.equal(keys[128:], before[128:])
    assert (
        "queue.keys" in model.state_dict() and "momentum_encoder.backbone.net.0.weight" in model.state_dict()
    )


def test_simclr_step_on_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    pl.seed_everything(0)
    torch.manual_seed(0)
    model = SimCLR(10, tiny_cnn("group"), Views(), optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    single_out.mkdir(), ddp_out.mkdir()
    trainer(2, [RecordFirstStep(str(ddp_out))], max_steps=1, limit_val_batches=0).fit(
        copy.deepcopy(model), ClusterDataModule("digits", batch_size=32)
    )
    trainer(1, [RecordFirstStep(str(single_out))], max_steps=1, limit_val_batches=0).fit(
        copy.deepcopy(model), ClusterDataModule("digits", batch_size=64)
    )
    assert_first_steps_equal(single_out, ddp_out)


@pytest.mark.parametrize("knn_k, agreement", [(1, 1.0), (3, 1 / 3)])
def test_knn_monitor_counts_the_knn_k_nearest(knn_k, agreement):
    """knn_k: how many neighbours the monitor asks about. Pairs of close points share a label and
    the pairs lie far apart with other labels: the nearest agrees, the 2nd and 3rd do not."""
    pairs = torch.arange(6.0)[:, None] * torch.tensor([[10.0, 0.0]])
    features = torch.cat([pairs, pairs + torch.tensor([[0.1, 0.0]])])  # point i and i + 6 a pair
    features = torch.cat([features, torch.ones(12, 1)], 1)  # off the origin: cosine sees direction
    labels = torch.arange(6).repeat(2)
    model = SimCLR(6, tiny_cnn(), Views(), knn_k=knn_k)
    model.knn_monitor("val", features, labels)
    assert model.diagnostics["knn_agreement"] == pytest.approx(agreement)
