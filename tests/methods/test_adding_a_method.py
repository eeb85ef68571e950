"""docs/adding-a-method.md, followed: a fifth method in under 100 lines, run through the real CLI.

IIC (Ji et al., ICCV 2019, "Invariant Information Clustering"): maximise the mutual information
between the cluster assignments of two views of each image. Its loss, its method (views, cluster
head, training step, folder recipe) and its config below are all a new method needs; the base
class, the CLI, evaluation, checkpoints, resume, figures, predict and the folder command
(`clusterlab cluster FOLDER --method <its class path>`) come with `ClusteringMethod`.
"""

import csv
import json

import torch
from torch import Tensor, nn

from clusterlab.cli import main
from clusterlab.data.views import Views
from clusterlab.distributed import gather
from clusterlab.losses.common import float32
from clusterlab.methods.base import ClusteringMethod, FolderRecipe, LRSchedulerCallable, OptimizerCallable
from clusterlab.nn.heads import ClusterHeads
from tests.cluster.folders import rows, write_photo_folder


@float32
def mutual_information_loss(z: Tensor, z_prime: Tensor, eps: float = 1e-8) -> Tensor:
    """-I(z, z'), IIC Eq. 3: P = 1/n sum_i z_i z'_i^T, symmetrised; I = sum P log(P / (P_c P_c'))."""
    joint = z.T @ z_prime / len(z)
    joint = ((joint + joint.T) / 2).clamp_min(eps)
    marginal_rows, marginal_columns = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    return -(joint * (joint.log() - marginal_rows.log() - marginal_columns.log())).sum()


class IIC(ClusteringMethod):
    """Clusters that two random views of an image agree on, as a whole (IIC, Algorithm 1).

    Args:
        num_clusters: C.
        backbone: the feature extractor.
        views: the random transformations g of Eq. 1.
        num_heads: heads trained side by side (IIC trains 5; the lowest loss is reported).
    """

    folder_recipe = FolderRecipe(views="clusterlab.data.views.SimCLRViews")  # and Adam 1e-3

    def __init__(
        self,
        num_clusters: int,
        backbone: nn.Module,
        views: Views,
        num_heads: int = 2,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(
            num_clusters, backbone, num_heads=num_heads, optimizer=optimizer, lr_scheduler=lr_scheduler
        )
        self.save_hyperparameters()
        self.views = views
        self.cluster_head = ClusterHeads(backbone.out_dim, num_clusters, num_heads)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["image"]
        z = self.cluster_head(self.backbone(self.views(x))).softmax(-1)  # heads x B x C
        z_prime = self.cluster_head(self.backbone(self.views(x))).softmax(-1)  # x' = g(x)
        z, z_prime = (gather(t.transpose(0, 1)).transpose(0, 1) for t in (z, z_prime))  # the global batch
        per_head = torch.stack([mutual_information_loss(a, b) for a, b in zip(z, z_prime)])
        return self.objective({"mutual_information": per_head.sum()}, head_losses=per_head)


CONFIG = """
seed_everything: 0
trainer: {max_epochs: 8, check_val_every_n_epoch: 8, num_sanity_val_steps: 0, enable_model_summary: false,
          logger: [{class_path: clusterlab.loggers.CSVLogger}]}
model:
  class_path: tests.methods.test_adding_a_method.IIC
  init_args:
    backbone: {class_path: clusterlab.nn.SmallCNN, init_args: {widths: [16, 32], downsample: [false, true]}}
    views: {class_path: clusterlab.data.views.SmallImageViews}
    optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.002}}
data: {dataset: digits, batch_size: 256}
figures: {embedding_points: 300}
"""


def test_a_new_method_runs_through_the_whole_cli(in_tmp):
    (in_tmp / "iic_digits.yaml").write_text(CONFIG)
    main(["fit", "--config", "iic_digits.yaml"])
    [run_dir] = (in_tmp / "runs" / "iic_digits").iterdir()
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["method"] == "IIC" and len(report["heads"]) == 2 and report["epochs"] == 8
    assert 0 < report["acc"] <= 1 and (run_dir / "figures" / "confusion.png").is_file()
    # It learns: the mutual information between the views' clusters grows, epoch after epoch.
    with open(run_dir / "metrics.csv", newline="") as f:
        losses = [
            float(r["train/mutual_information"]) for r in csv.DictReader(f) if r["train/mutual_information"]
        ]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.01
    checkpoint = str(run_dir / "checkpoints" / "last.ckpt")
    main(["test", "--config", str(run_dir / "config.yaml"), "--ckpt_path", checkpoint])
    tested = json.loads(next(run_dir.glob("test-*/metrics.json")).read_text())
    assert tested["acc"] == report["acc"]


def test_a_new_method_groups_a_folder_through_the_folder_command(tmp_path):
    """Its folder recipe is all `clusterlab cluster` needs: named by class path, IIC trains on a
    folder of photos, and every image gets a cluster (two epochs: seconds)."""
    write_photo_folder(tmp_path / "photos", per_kind=8)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--method", f"{__name__}.IIC", "--num_clusters", "3"]
    main(["cluster", str(tmp_path / "photos"), *argv, "--epochs", "2", "--batch_size", "16"])
    summary = json.loads((out / "cluster.json").read_text())
    assert summary["method"] == "IIC" and summary["num_clusters"] == 3 and summary["epochs"] == 2
    assigned = rows(out / "assignments.csv")
    assert len(assigned) == 4 * 8 and {int(r["cluster"]) for r in assigned} <= {0, 1, 2}
    assert (out / "report.html").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert f"class_path: {__name__}.IIC" in (out / "config.yaml").read_text()
