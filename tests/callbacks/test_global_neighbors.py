"""NNM's global neighbour table: in dataset order, each row its own neighbour's predictions."""

import pytorch_lightning as pl
import torch

from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.views import Views
from clusterlab.methods import NNM
from tests.helpers import assert_top_k, fit_digits, similarity, tiny_cnn


def test_global_table_row_i_holds_the_predictions_of_i_s_own_nearest_neighbour(pretext):
    pl.seed_everything(0)
    model = NNM(10, tiny_cnn(), Views(), pretext_checkpoint=pretext)
    fit_digits(model, limit_val_batches=0)  # a shuffled loader: the table must not follow its order
    table, stored = model.global_neighbors.table, model.global_neighbors.neighbor_index
    images = ClusterDataModule("digits").split("train+test").images
    model.eval()
    with torch.no_grad():
        _, logits = model.features_and_logits(model.plain(images))
    assert_top_k(stored[:, None], similarity(model.backbone, model.plain, images))  # i's nearest neighbour
    predictions = logits.softmax(-1)
    assert table.shape == (3, len(images), 10)
    torch.testing.assert_close(table, predictions[:, stored], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(table, predictions, atol=1e-3)  # not the sample's own predictions
