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
