"""SCL: the semantic memory, the momentum encoder, the epoch refresh and the method's claims."""

import functools
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from clusterlab.callbacks import MomentumEncoder
from clusterlab.callbacks.scl import split_small_clusters
from clusterlab.cli import main
from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.views import SmallImageViews
from clusterlab.methods import SCL
from clusterlab.methods.scl import CLUSTERING, OVER, UNDER
from clusterlab.nn import SmallCNN
from clusterlab.nn.memory import SampleTable, KeyQueues
from tests.helpers import REPO


def tiny_scl(**kwargs) -> SCL:
    torch.manual_seed(0)
    args = {"memory_size": 90, "views": SmallImageViews(), "optimizer": functools.partial(torch.optim.SGD, lr=0.03,
                                                                                          momentum=0.9)}  # fmt: skip
    return SCL(10, SmallCNN(1, (8, 16), (False, True)), **{**args, **kwargs})


def trainer(callbacks=(), **kwargs) -> pl.Trainer:
    kwargs = {"limit_val_batches": 0, **kwargs}
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks), **kwargs)  # fmt: skip


# -- the semantic memory ----------------------------------------------------------------------


def test_memory_enqueue_is_first_in_first_out_per_queue_as_if_one_key_at_a_time():
    torch.manual_seed(0)
    fast, slow = KeyQueues(3, 4, 2), KeyQueues(3, 4, 2)
    slow.load_state_dict(fast.state_dict())
    for step in range(5):
        n = 7 if step != 3 else 13  # step 3 brings one queue more keys than it holds
        keys, queue, index = torch.randn(n, 2), torch.randint(0, 3, (n,)), torch.arange(n) + 100 * step
        fast.enqueue(keys, queue, index)
        for key, j, i in zip(keys, queue, index):  # the reference: one key at a time
            slow.keys[j, slow.pointer[j]], slow.index[j, slow.pointer[j]] = key, i
            slow.pointer[j] = (slow.pointer[j] + 1) % 4
        for name in ("keys", "index", "pointer"):
            assert torch.equal(getattr(fast, name), getattr(slow, name)), (step, name)


def test_memory_shapes_are_fixed_at_construction_and_in_the_state_dict():
    model = tiny_scl()  # C = 10: 90 // 9 = 10 keys per cluster; C / 2 = 5: 90 // 4 = 22; instances: 90
    state = model.state_dict()
    assert state["semantic_memory.clustering.keys"].shape == (10, 10, 128)
    assert state["semantic_memory.under_clustering.keys"].shape == (5, 22, 128)
    assert state["semantic_memory.over_clustering.keys"].shape == (1, 90, 128)
    assert all(name in state for name in ("sample_table.labels", "sample_table.changes", "momentum_encoder.backbone.net.0.weight"))


def test_sample_table_takes_its_length_from_a_checkpoint():
    saved = SampleTable(2)
    saved.reset(7, [4, 2], torch.Generator().manual_seed(0))
    loaded = SampleTable(2)
    loaded.load_state_dict(saved.state_dict())
    assert torch.equal(loaded.labels, saved.labels) and len(loaded) == 7
    assert torch.bincount(saved.labels[0]).tolist() == [2, 2, 2, 1]  # a balanced random partition


class RecordSteps(pl.Callback):
    """Before each training batch: the pseudo labels, the memory, the batch."""

    def __init__(self):
        self.snapshots = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snapshots.append({
            "epoch": trainer.current_epoch, "batch": batch["index"].clone(),
            "labels": pl_module.sample_table.labels.clone(),
            "memory": {t: (m.keys.clone(), m.index.clone()) for t, m in pl_module.semantic_memory.items()},
        })  # fmt: skip


def test_every_queue_only_ever_holds_keys_of_its_own_cluster():
    record = RecordSteps()
    model = tiny_scl(memory_size=45)  # 5 keys per cluster: the queues wrap around many times
    trainer([record], max_epochs=3, limit_train_batches=4).fit(model, ClusterDataModule("digits", batch_size=32))
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


# -- the momentum encoder ---------------------------------------------------------------------


class RecordWeights(pl.Callback):
    def __init__(self):
        self.online, self.momentum = [], []

    def _record(self, pl_module):
        self.online.append({n: p.detach().clone() for n, p in pl_module.backbone.named_parameters()})
        self.momentum.append({n: p.detach().clone() for n, p in pl_module.momentum_encoder["backbone"].named_parameters()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record(pl_module)

    def on_train_end(self, trainer, pl_module):
        self._record(pl_module)


def test_momentum_encoder_moves_once_per_optimizer_step_with_gradient_accumulation():
    record = RecordWeights()
    model = tiny_scl()
    trainer([record], max_epochs=1, limit_train_batches=4, accumulate_grad_batches=2).fit(
        model, ClusterDataModule("digits", batch_size=32))
    assert model.trainer.global_step == 2
    online, momentum, m = record.online, record.momentum, 0.9
    for name in online[0]:
        assert torch.equal(online[1][name], online[0][name])  # batch 0 accumulated: no step ...
        assert torch.equal(momentum[1][name], momentum[0][name])  # ... and no momentum update
        assert not torch.equal(online[2][name], online[1][name])  # batch 1 stepped
        torch.testing.assert_close(momentum[2][name], m * momentum[1][name] + (1 - m) * online[2][name])
        assert torch.equal(momentum[3][name], momentum[2][name])
        torch.testing.assert_close(momentum[4][name], m * momentum[3][name] + (1 - m) * online[4][name])
    # Keys come from the momentum encoder without gradients.
    assert all(not p.requires_grad and p.grad is None for p in model.momentum_encoder.parameters())


def test_momentum_schedule_rises_from_m_to_its_final_value():
    constant, cosine = MomentumEncoder(0.9), MomentumEncoder(0.9, final_momentum=1.0)
    assert constant.momentum_at(50, 100) == 0.9
    values = [cosine.momentum_at(step, 100) for step in range(101)]
    assert values[0] == pytest.approx(0.9) and values[50] == pytest.approx(0.95) and values[100] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(values, values[1:]))


# -- the epoch refresh: Eqs. 5 and 6, and the imbalance guard ----------------------------------


class RecordRefresh(pl.Callback):
    """Eq. 5 computed here, independently, from the weights at the end of epoch 0."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            images = trainer.datamodule.train_set.images
            pl_module.eval()
            self.expected = [logits.argmax(1) for logits, _ in pl_module.assignments(images)]
            pl_module.train()
            self.before = pl_module.sample_table.labels.clone()


def test_pseudo_labels_are_the_classifiers_argmax_over_the_whole_training_set_and_changes_are_counted():
    record = RecordRefresh()
    model = tiny_scl(imbalance_guard=False)
    trainer([record], max_epochs=2, limit_train_batches=2).fit(model, ClusterDataModule("digits", batch_size=32))
    table = model.sample_table
    for row in range(2):
        assert torch.equal(table.labels[row], record.expected[row])  # Eq. 5
        assert torch.equal(table.changes[row], (record.expected[row] != record.before[row]).long())  # Eq. 6
    assert table.epoch == 1


def test_the_imbalance_guard_refills_a_small_cluster_by_splitting_the_largest():
    torch.manual_seed(0)
    a, b, c = torch.eye(3) * 5
    # Cluster 0 holds two well separated groups; cluster 2 has shrunk to 3 samples close to cluster 1.
    features = torch.cat([a + torch.randn(50, 3) * 0.1, b + torch.randn(50, 3) * 0.1, c + torch.randn(40, 3) * 0.1,
                          c + torch.randn(3, 3) * 0.1])  # fmt: skip
    labels = torch.tensor([0] * 100 + [1] * 40 + [2] * 3)
    guarded = split_small_clusters(labels, features, 3, min_size=10, seed=0)
    assert (torch.bincount(guarded, minlength=3) >= 10).all()
    assert guarded[140:].tolist() == [1, 1, 1]  # the small cluster's samples joined the nearest centroid
    # The largest cluster was split along its two groups, one of which refills cluster 2.
    assert len(set(guarded[:50].tolist())) == 1 and len(set(guarded[50:100].tolist())) == 1
    assert {guarded[0].item(), guarded[50].item()} == {0, 2}
    assert torch.equal(split_small_clusters(guarded, features, 3, 10, 0), guarded)  # no small cluster: unchanged


# -- ablation switches and configs -----------------------------------------------------------


@pytest.mark.parametrize("switches", [
    {"cross_cluster": False},                       # Fig. 3: w/o cross-cluster ID
    {"use_concept_loss": False},                        # Fig. 3: w/o online CD (labels from Eq. 3)
    {"cross_cluster": False, "use_concept_loss": False},  # Fig. 3: MoCo-like baseline
    {"under_clustering": False, "over_clustering": False},  # Fig. 4: clustering only
    {"clustering_task": False, "over_clustering": False},  # Fig. 4: under-clustering only (k-means)
    {"clustering_task": False, "under_clustering": False},  # Fig. 4: over-clustering only (k-means)
    {"use_hard_sample_weights": False},                 # Table 3
    {"query_view": "plain"},
])  # fmt: skip
def test_every_ablation_trains_and_evaluates(switches):
    model = tiny_scl(**switches)
    trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=2).fit(model, ClusterDataModule("digits", batch_size=32))
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
    for setting in ("class_path: clusterlab.methods.SCL", "class_path: torch.optim.SGD", "lr: 0.03",
                    "weight_decay: 0.0005", "CosineAnnealingLR", "T_max: 200", "max_epochs: 200",
                    "batch_size: 256", "depth: 34", "stem: cifar", "momentum: 0.9", "temperature: 0.1",
                    "memory_size: 4096", "dataset: cifar20"):  # fmt: skip
        assert setting in printed, setting


def test_cifar100_config_runs_two_steps_on_cifar100_in_its_real_format(in_tmp):
    from tests import formats

    formats.write_cifar100(in_tmp / "data")
    main(["fit", "--config", str(Path(REPO, "experiments/scl_cifar100.yaml")), "--data.root", str(in_tmp / "data"),
          "--trainer.fast_dev_run", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
          "--data.batch_size", "4", "--trainer.logger", "false", "--kmeans_baseline", "false"])  # fmt: skip
    report = json.loads(next((in_tmp / "runs" / "scl_cifar100").glob("*/metrics.json")).read_text())
    assert report["method"] == "SCL" and report["num_clusters"] == 20 and report["steps"] == 2
