"""DCCM as a method: its net and shallow map, its views, the ablation switches, the distributed
pseudo-graph, and an exact resume."""

import copy
import functools
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from clusterlab.cli import ClusterLabCLI
from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.data.sources import Digits
from clusterlab.data.views import GeometricViews, Views
from clusterlab.methods import DCCM
from clusterlab.nn import DCCMNet, ResNet, SmallCNN
from tests.ddp_workers import RecordFirstStep
from tests.helpers import REPO, kill_and_resume
from tests.test_distributed import _trainer

# -- the net and its shallow feature map ------------------------------------------------------


def test_dccm_net_is_the_authors_cifar_net_with_m_after_the_first_pool():
    net = DCCMNet(in_channels=3).eval()
    x = torch.rand(2, 3, 32, 32)
    features, shallow = net(x, with_shallow=True)
    assert features.shape == (2, 64) and shallow.shape == (2, 64, 14, 14)  # the authors' M: 64 x 14 x 14
    assert torch.equal(features, net(x))
    assert net.shallow_dim == 64 and net.out_dim == 64


def test_dccm_net_takes_8x8_grey_digits_when_padded_and_says_why_when_not():
    features, shallow = DCCMNet(in_channels=1, padding=1)(torch.rand(4, 1, 8, 8), with_shallow=True)
    assert features.shape == (4, 64) and shallow.shape == (4, 64, 4, 4)
    with pytest.raises(ValueError, match="needs images of at least 20 px; got \\(8, 8\\): use padding: 1"):
        DCCMNet(in_channels=1)(torch.rand(4, 1, 8, 8))
    assert DCCMNet(in_channels=1)(torch.rand(2, 1, 28, 28), with_shallow=True)[1].shape == (2, 64, 12, 12)


@pytest.mark.parametrize("backbone,size,shape", [
    (SmallCNN(1, (8, 16, 32), (False, True, False)), 8, (16, 4, 4)),  # default: after the first pool
    (SmallCNN(1, (8, 16, 32), (False, True, False), shallow_block=0), 8, (8, 8, 8)),
    (ResNet(18, "cifar"), 32, (128, 16, 16)),  # default: layer2
    (ResNet(18, "cifar", shallow="layer1"), 32, (64, 32, 32)),
])  # fmt: skip
def test_shared_backbones_name_their_shallow_map(backbone, size, shape):
    backbone.eval()
    x = torch.rand(2, backbone.net[0].in_channels if isinstance(backbone, SmallCNN) else 3, size, size)
    features, shallow = backbone(x, with_shallow=True)
    assert shallow.shape[1:] == shape and backbone.shallow_dim == shape[0]
    torch.testing.assert_close(features, backbone(x))


# -- views ------------------------------------------------------------------------------------


def test_geometric_views_draw_per_image_and_keep_size_and_range():
    image = Digits().load("train+test").images[:1]
    views = GeometricViews(flip=False)(image.repeat(16, 1, 1, 1))
    assert views.shape == (16, 1, 8, 8) and views.min() >= 0 and views.max() <= 1
    assert len({tuple(v.flatten().tolist()) for v in views}) == 16
    still = GeometricViews(rotation=0, shift=0, zoom=(1.0, 1.0), flip=False, channel_shift=0)
    torch.testing.assert_close(still(image), image.float() / 255)


# -- the method -------------------------------------------------------------------------------

DIGITS = str(Path(REPO, "experiments", "dccm_digits.yaml"))
ABLATIONS = {  # dccm-paper Table 3, as config overrides
    "M1": (["--model.init_args.use_local_robustness", "false", "--model.init_args.use_pseudo_label_loss", "false",
            "--model.init_args.use_mutual_information_loss", "false"], {"pseudo_graph"}),
    "M2": (["--model.init_args.use_pseudo_label_loss", "false", "--model.init_args.use_mutual_information_loss", "false"],
           {"pseudo_graph", "pseudo_graph_transformed"}),
    "M3": (["--model.init_args.use_mutual_information_loss", "false"],
           {"pseudo_graph", "pseudo_graph_transformed", "pseudo_label", "pseudo_label_transformed"}),
    "M4": ([], {"pseudo_graph", "pseudo_graph_transformed", "pseudo_label", "pseudo_label_transformed",
                "mutual_information"}),
}  # fmt: skip


@pytest.mark.parametrize("row", ABLATIONS)
def test_table_3_rows_are_config_overrides(row, in_tmp):
    overrides, expected_terms = ABLATIONS[row]
    model = ClusterLabCLI(args=["--config", DIGITS, *overrides], run=False).model
    captured = {}
    model.objective = lambda terms, head_losses=None: captured.update(terms) or sum(terms.values())
    model.log_diagnostics = lambda *args: None
    images = Digits().load("train+test").images[:64]
    batch = {"image": images, "index": torch.arange(64), "label": torch.zeros(64, dtype=torch.long)}
    model.training_step(batch, 0).backward()
    assert set(captured) == expected_terms
    assert (model.discriminator is not None) == ("mutual_information" in expected_terms)


def test_random_pairs_do_not_depend_on_how_the_batch_is_ordered_or_split():
    model = DCCM(10, SmallCNN(1, (8, 16), (False, True)), Views())
    index = torch.randperm(1797)[:48]
    order = torch.randperm(48)
    scores = model.pair_scores(index, batch_idx=5)
    torch.testing.assert_close(model.pair_scores(index[order], batch_idx=5), scores[order][:, order])
    assert not torch.equal(model.pair_scores(index, batch_idx=6), scores)


def _dccm_model() -> DCCM:
    torch.manual_seed(0)
    # Batch-independent throughout (GroupNorm, no BatchNorm on the logits): torch has no
    # SyncBatchNorm on CPU. Identity views: each process draws its own views. The thresholds sit
    # at the median similarity and confidence of this freshly initialised net, so the batch has
    # pseudo-graph positives and negatives, confident and unconfident samples.
    backbone = SmallCNN(1, widths=(8, 16), downsample=(False, True), norm="group")
    return DCCM(10, backbone, Views(), graph_threshold=0.9992, label_threshold=0.245, discriminator_dim=16,
                logit_norm=False, optimizer=functools.partial(torch.optim.SGD, lr=0.1))  # fmt: skip


def test_dccm_training_step_on_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    pl.seed_everything(0)
    model = _dccm_model()
    single_out, ddp_out = tmp_path / "single", tmp_path / "ddp"
    single_out.mkdir(), ddp_out.mkdir()

    _trainer(2, RecordFirstStep(str(ddp_out)), max_steps=1, limit_val_batches=0).fit(
        copy.deepcopy(model), ClusterDataModule("digits", batch_size=32))
    single_model = copy.deepcopy(model)
    _trainer(1, RecordFirstStep(str(single_out)), max_steps=1, limit_val_batches=0).fit(
        single_model, ClusterDataModule("digits", batch_size=64))

    # Every term is at work in this step: the pseudo-graph has positives and negatives, some
    # predictions are confident, and the mutual information has pairs of both kinds.
    logged = single_model.trainer.callback_metrics
    assert 0.1 < logged["train/graph_positives"] < 0.9 and 0.1 < logged["train/confident"] < 0.9
    for term in ("pseudo_graph", "pseudo_label", "pseudo_graph_transformed", "mutual_information"):
        assert logged[f"train/{term}"] > 0, term

    single = torch.load(single_out / "rank0.pt")
    ranks = [torch.load(ddp_out / f"rank{r}.pt") for r in range(2)]
    assert sorted(torch.cat([r["batch"] for r in ranks]).tolist()) == sorted(single["batch"].tolist())
    for result in ranks:
        assert float(result["loss"]) == pytest.approx(float(single["loss"]), rel=1e-5)
        assert result["grads"].keys() == single["grads"].keys()
        assert any(name.startswith("discriminator") for name in single["grads"])
        for name, grad in single["grads"].items():
            # float32 sums in another order: agreement to 1e-4 of each gradient's scale
            scale = float(grad.abs().max())
            torch.testing.assert_close(result["grads"][name], grad, rtol=0, atol=1e-4 * scale + 1e-9, msg=name)


TINY_DCCM = """
seed_everything: 3
trainer:
  max_epochs: 4
  limit_train_batches: 3
  check_val_every_n_epoch: 1
  num_sanity_val_steps: 0
  enable_model_summary: false
  logger:
  - class_path: clusterlab.loggers.CSVLogger
model:
  class_path: clusterlab.methods.DCCM
  init_args:
    backbone:
      class_path: clusterlab.nn.SmallCNN
      init_args: {in_channels: 1, widths: [8, 16], downsample: [false, true]}
    views:
      class_path: clusterlab.data.views.GeometricViews
      init_args: {flip: false}
    discriminator_dim: 16
    optimizer:
      class_path: torch.optim.RMSprop
      init_args: {lr: 0.001}
data:
  dataset: digits
  batch_size: 64
kmeans_baseline: false
"""


def test_killed_and_resumed_dccm_run_ends_with_the_same_weights(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_DCCM)
    expected, _, _ = kill_and_resume(tmp_path, "tiny.yaml")
    assert any(name.startswith("discriminator.") for name in expected["state_dict"])
    # The mutual information had random negatives to draw: the resumed run drew the same ones.
    log = next((tmp_path / "runs" / "whole").glob("*/metrics.csv")).read_text().splitlines()
    column = log[0].split(",").index("train/graph_positives")
    assert any(0 < float(row.split(",")[column]) < 1 for row in log[1:] if row.split(",")[column])
