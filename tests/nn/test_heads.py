"""KMeansHead under DDP: the evaluation's features go to rank 0 alone, which fits k-means and reports;
every rank ends with its centres and its report."""

import copy

import pytest
import pytorch_lightning as pl
import torch

from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.views import Views
from clusterlab.methods import SimCLR
from clusterlab.nn import SmallCNN
from tests.ddp_workers import RecordKMeansEvaluation
from tests.helpers import trainer


def test_kmeans_head_evaluation_on_two_processes_equals_one_process(tmp_path):
    torch.manual_seed(0)
    backbone = SmallCNN(1, widths=(8, 16), downsample=(False, True), norm="group")  # per-sample outputs
    model = SimCLR(10, backbone, Views())
    pl.seed_everything(0)
    trainer(2, RecordKMeansEvaluation(str(tmp_path))).validate(
        copy.deepcopy(model), ClusterDataModule("digits", eval_batch_size=100)
    )
    (tmp_path / "single").mkdir()
    trainer(1, RecordKMeansEvaluation(str(tmp_path / "single"))).validate(
        copy.deepcopy(model), ClusterDataModule("digits", eval_batch_size=100)
    )
    zero, one = (torch.load(tmp_path / f"kmeans_rank{r}.pt") for r in range(2))
    single = torch.load(tmp_path / "single" / "kmeans_rank0.pt")
    assert zero["eval"] == one["eval"] and zero["diagnostics"] == one["diagnostics"]
    assert torch.equal(zero["centroids"], one["centroids"])  # rank 0's fit, broadcast
    assert zero["centroids"].abs().sum() > 0
    for key in ("acc", "nmi", "ari"):
        assert zero["eval"][key] == pytest.approx(single["eval"][key], abs=1e-6)
    assert zero["diagnostics"]["knn_agreement"] == pytest.approx(single["diagnostics"]["knn_agreement"])
    torch.testing.assert_close(zero["centroids"], single["centroids"], rtol=1e-4, atol=1e-5)
