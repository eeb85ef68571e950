"""SCL: the semantic memory's invariants, the contrastive sets, the ablations and the paper's configs."""

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from clusterlab.cli import main
from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.methods.scl import CLUSTERING, OVER, UNDER
from tests.helpers import REPO, tiny_scl, trainer


class RecordSteps(pl.Callback):
    """Before each training batch: the pseudo labels, the memory, the batch."""

    def __init__(self):
        self.snapshots = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snapshots.append(
            {
                "epoch": trainer.current_epoch,
                "batch": batch["index"].clone(),
                "labels": pl_module.sample_table.labels.clone(),
                "memory": {
                    t: (m.keys.clone(), m.index.clone()) for t, m in pl_module.semantic_memory.items()
                },
            }
        )


def test_every_queue_only_ever_holds_keys_of_its_own_cluster():
    record = RecordSteps()
    model = tiny_scl(memory_size=45)  # 5 keys per cluster: the queues wrap around many times
    trainer(callbacks=[record], max_epochs=3, limit_train_batches=4, limit_val_batches=0).fit(
        model, ClusterDataModule("digits", batch_size=32)
    )
    assert model.sample_table.epoch == 2 and (model.sample_table.changes > 0).any()  # labels were refreshed
    checked = 0
    for before, after in zip(record.snapshots, record.snapshots[1:]):
        if after["epoch"] != before["epoch"]:
            continue
        for row, task in enumerate((CLUSTERING, UNDER)):
            keys_before, _ = before["memory"][task]
            keys, index = after["memory"][task]
            written = (keys != keys_before).any(-1)  # the slots the step between the snapshots wrote
            queue = torch.arange(len(keys))[:, None].expand_as(index)
            # Each written key is from the batch, and sits in the queue of its sample's pseudo label.
            assert torch.isin(index[written], before["batch"]).all()
            assert torch.equal(before["labels"][row][index[written]], queue[written])
            checked += int(written.sum())
        keys_before, _ = before["memory"][OVER]
        keys, index = after["memory"][OVER]
        assert sorted(index[(keys != keys_before).any(-1)].tolist()) == sorted(before["batch"].tolist())
    assert checked > 100


def test_a_samples_contrastive_set_never_contains_its_own_clusters_queue():
    """Through the method: the instance loss does not see the queue of the batch's cluster."""
    model = tiny_scl(use_concept_loss=False, under_clustering=False, over_clustering=False)
    model.sample_table.reset(1797, [10], torch.Generator().manual_seed(0))
    model.sample_table.labels[0, :32] = 3  # the whole batch in cluster 3
    batch = {"index": torch.arange(32), "image": ClusterDataModule("digits").split("train+test").images[:32]}
    memory = model.semantic_memory[CLUSTERING]

    def loss():
        torch.manual_seed(1)  # the same views every time
        return model.training_step(batch, 0).item()

    reference = loss()
    memory.keys[3] = torch.nn.functional.normalize(torch.randn_like(memory.keys[3]), dim=-1)
    assert loss() == reference
    memory.keys[4] = torch.nn.functional.normalize(torch.randn_like(memory.keys[4]), dim=-1)
    assert loss() != reference


def test_size_reweighting_weighs_the_concept_loss_by_the_pseudo_label_cluster_sizes():
    """Balanced pseudo labels: ODC's weights are equal and Eq. 4 is its plain mean; once one
    cluster holds most samples, its samples weigh less and the loss moves."""
    batch = {"index": torch.arange(64), "image": ClusterDataModule("digits").split("train+test").images[:64]}

    def concept(size_reweighting, labels):
        torch.manual_seed(0)
        model = tiny_scl(
            use_instance_loss=False,
            under_clustering=False,
            over_clustering=False,
            size_reweighting=size_reweighting,
        )
        model.sample_table.reset(1797, [10], torch.Generator().manual_seed(0))
        if labels is not None:
            model.sample_table.labels[0] = labels
        torch.manual_seed(1)  # the same views every time
        return model.training_step(batch, 0).item()

    assert concept(True, None) == pytest.approx(concept(False, None), rel=1e-5)  # sizes 179 and 180
    imbalanced = torch.arange(1797) % 10
    imbalanced[:1200] = 0  # cluster 0 holds two thirds of the samples, and half of the batch
    imbalanced[:64:2] = torch.arange(32) % 9 + 1
    assert concept(True, imbalanced) != pytest.approx(concept(False, imbalanced), rel=1e-3)


@pytest.mark.parametrize(
    "switches",
    [
        {"cross_cluster": False},  # Fig. 3: w/o cross-cluster ID
        {"use_concept_loss": False},  # Fig. 3: w/o online CD (labels from Eq. 3)
        {"cross_cluster": False, "use_concept_loss": False},  # Fig. 3: MoCo-like baseline
        {"under_clustering": False, "over_clustering": False},  # Fig. 4: clustering only
        {"clustering_task": False, "over_clustering": False},  # Fig. 4: under-clustering only (k-means)
        {"clustering_task": False, "under_clustering": False},  # Fig. 4: over-clustering only (k-means)
        {"use_hard_sample_weights": False},  # Table 3
        {"size_reweighting": False},  # ODC's loss re-weighting off
        {"query_view": "plain"},
    ],
)
def test_every_ablation_trains_and_evaluates(switches):
    model = tiny_scl(**switches)
    trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=2).fit(
        model, ClusterDataModule("digits", batch_size=32)
    )
    model.trainer.validate(model, ClusterDataModule("digits", eval_batch_size=256), verbose=False)
    assert 0 <= model.eval_results["acc"] <= 1
    assert model.predict_proba(ClusterDataModule("digits").split("train+test").images[:3]).shape == (1, 3, 10)


class RecordClassifiers(pl.Callback):
    """At each epoch's first batch (after the refresh): the classifiers, the labels and q."""

    def __init__(self):
        self.starts = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            return
        images = trainer.datamodule.train_set.images
        pl_module.eval()  # as the refresh reads q (batch norm's running statistics, left unchanged)
        with torch.no_grad():
            h = pl_module.backbone(pl_module.plain(images))
            q = {t: pl_module.projections[t](h) for t in pl_module.task_clusters_by_name}
        pl_module.train()
        self.starts[trainer.current_epoch] = {
            "classifiers": {
                task: {k: v.clone() for k, v in classifier.state_dict().items()}
                for task, classifier in (
                    (CLUSTERING, pl_module.cluster_head.heads[0]),
                    (UNDER, pl_module.classifiers[UNDER]),
                )
            },
            "labels": pl_module.sample_table.labels.clone(),
            "q": q,
        }


def test_partition_init_epoch_starts_each_restarts_partition_at_k_means_of_q():
    record = RecordClassifiers()
    model = tiny_scl(partition_init_epoch=1, restarts=2, imbalance_guard=False)
    run = trainer(callbacks=[record], max_epochs=4, limit_train_batches=2, limit_val_batches=0)
    run.fit(model, ClusterDataModule("digits", batch_size=32))
    for epoch in (1, 3):  # epoch 1 of each restart (restarts of 2 epochs)
        start = record.starts[epoch]
        for row, task in enumerate((CLUSTERING, UNDER)):
            weight, bias = start["classifiers"][task]["weight"], start["classifiers"][task]["bias"]
            # A logit per k-means centre, all at one scale, no bias; the refresh's labels are its argmax:
            assert (bias == 0).all() and torch.allclose(weight.norm(dim=1), weight.norm(dim=1)[0])
            q = torch.nn.functional.normalize(start["q"][task], dim=1)
            labels = start["labels"][row]
            # (q read in one batch here, in the refresh's batches there: near-ties may round apart)
            assert (labels == (q @ weight.T).argmax(1)).float().mean() > 0.99
            # ... and the centres are k-means': each is the direction of its cluster's mean q.
            clusters = model.task_clusters[row]
            means = torch.zeros(clusters, q.shape[1]).index_add_(0, labels, q)
            cosine = torch.nn.functional.cosine_similarity(means, weight, dim=1)
            assert cosine.min() > 0.99, (epoch, task, cosine)
    # The epochs between are the paper's: the refresh follows the trained classifier.
    assert (record.starts[2]["classifiers"][CLUSTERING]["bias"] != 0).any()


def test_partition_init_epoch_needs_a_refresh_and_a_classifier():
    for switches in ({"partition_init_epoch": 0}, {"partition_init_epoch": 1, "use_concept_loss": False}):
        with pytest.raises(ValueError, match="partition_init_epoch"):
            tiny_scl(**switches)


def test_an_scl_config_without_any_loss_or_task_is_refused():
    with pytest.raises(ValueError, match="use_instance_loss, use_concept_loss or both"):
        tiny_scl(use_instance_loss=False, use_concept_loss=False)
    with pytest.raises(ValueError, match="at least one of clustering_task"):
        tiny_scl(clustering_task=False, under_clustering=False, over_clustering=False)


def test_cifar100_config_shows_the_papers_settings(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(Path(REPO, "experiments/scl_cifar100.yaml")), "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    for setting in (
        "class_path: clusterlab.methods.SCL",
        "class_path: torch.optim.SGD",
        "lr: 0.03",
        "weight_decay: 0.0005",
        "CosineAnnealingLR",
        "T_max: 200",
        "max_epochs: 200",
        "batch_size: 256",
        "depth: 34",
        "stem: cifar",
        "momentum: 0.9",
        "temperature: 0.1",
        "memory_size: 4096",
        "dataset: cifar20",
    ):
        assert setting in printed, setting


def test_cifar100_config_runs_two_steps_on_cifar100_in_its_real_format(in_tmp):
    from tests import formats

    formats.write_cifar100(in_tmp / "data")
    main(
        [
            "fit",
            "--config",
            str(Path(REPO, "experiments/scl_cifar100.yaml")),
            "--data.root",
            str(in_tmp / "data"),
            "--trainer.fast_dev_run",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--data.batch_size",
            "4",
            "--trainer.logger",
            "false",
            "--kmeans_baseline",
            "false",
        ]
    )
    report = json.loads(next((in_tmp / "runs" / "scl_cifar100").glob("*/metrics.json")).read_text())
    assert report["method"] == "SCL" and report["num_clusters"] == 20 and report["steps"] == 2
