"""SCL's epoch refresh: Eqs. 5 and 6 over the whole training set, and the imbalance guard."""

import pytorch_lightning as pl
import torch

from clusterlab.callbacks.scl import split_small_clusters
from clusterlab.data.datamodule import ClusterDataModule
from tests.helpers import tiny_scl, trainer


class RecordRefresh(pl.Callback):
    """Eq. 5 computed here, independently, from the weights at the end of epoch 0."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            images = trainer.datamodule.train_set.images
            pl_module.eval()
            self.expected = [logits.argmax(1) for logits, _ in pl_module.task_outputs(images)]
            pl_module.train()
            self.before = pl_module.sample_table.labels.clone()


def test_pseudo_labels_are_the_classifiers_argmax_over_the_whole_training_set_and_changes_are_counted():
    record = RecordRefresh()
    model = tiny_scl(imbalance_guard=False)
    trainer(callbacks=[record], limit_val_batches=0, max_epochs=2, limit_train_batches=2).fit(
        model, ClusterDataModule("digits", batch_size=32)
    )
    table = model.sample_table
    for row in range(2):
        assert torch.equal(table.labels[row], record.expected[row])  # Eq. 5
        assert torch.equal(table.changes[row], (record.expected[row] != record.before[row]).long())  # Eq. 6
    assert table.epoch == 1


def test_the_imbalance_guard_refills_a_small_cluster_by_splitting_the_largest():
    torch.manual_seed(0)
    a, b, c = torch.eye(3) * 5
    # Cluster 0 holds two well separated groups; cluster 2 has shrunk to 3 samples close to cluster 1.
    features = torch.cat(
        [
            a + torch.randn(50, 3) * 0.1,
            b + torch.randn(50, 3) * 0.1,
            c + torch.randn(40, 3) * 0.1,
            c + torch.randn(3, 3) * 0.1,
        ]
    )
    labels = torch.tensor([0] * 100 + [1] * 40 + [2] * 3)
    guarded = split_small_clusters(labels, features, 3, min_size=10, seed=0)
    assert (torch.bincount(guarded, minlength=3) >= 10).all()
    assert guarded[140:].tolist() == [1, 1, 1]  # the small cluster's samples joined the nearest centroid
    # The largest cluster was split along its two groups, one of which refills cluster 2.
    assert len(set(guarded[:50].tolist())) == 1 and len(set(guarded[50:100].tolist())) == 1
    assert {guarded[0].item(), guarded[50].item()} == {0, 2}
    assert torch.equal(
        split_small_clusters(guarded, features, 3, 10, 0), guarded
    )  # no small cluster: unchanged
