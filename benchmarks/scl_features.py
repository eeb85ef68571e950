"""Is an SCL run's weak ACC its representation or its classifier? A diagnosis of one checkpoint.

    python benchmarks/scl_features.py runs/scl_fashion_mnist/<run>/checkpoints/last.ckpt \
        [--out benchmarks/results/scl-features-fashion.md]

On the run's training set (the checkpoint's data set and split), compares the clusters of the
target task's classifier (what the run reports) with k-means (faiss, 10 restarts) on the
L2-normalised backbone features and on the clustering task's q. Labels only score the partitions.
If k-means on q is no better than the classifier, the representation is what holds ACC back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import command_line, machine_line, write_report  # noqa: E402

from clusterlab.data.datamodule import ClusterDataModule  # noqa: E402
from clusterlab.methods import SCL  # noqa: E402
from clusterlab.metrics import evaluate  # noqa: E402
from clusterlab.neighbors import kmeans  # noqa: E402


@torch.no_grad()
def diagnose(checkpoint: Path, batch_size: int = 1000) -> list[tuple[str, dict, list[int]]]:
    model = SCL.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    data_args = torch.load(checkpoint, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    data_args.pop("_instantiator", None)  # LightningCLI's note of how it built the module
    data = ClusterDataModule(**data_args)
    data.setup("fit")
    images, labels = data.train_set.images, data.train_set.labels
    backbone, q, predicted = [], [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        logits, q_batch = model.task_outputs(batch)[0]  # the target task's (Eq. 5's input), q normalised
        backbone.append(model.cluster_features(model.plain(batch)))
        q.append(q_batch)
        predicted.append(logits.argmax(1))
    k = model.num_clusters
    rows = [("the run's classifier (reported)", torch.cat(predicted))]
    for name, features in (("k-means, backbone features", torch.cat(backbone)), ("k-means, q", torch.cat(q))):
        rows.append((name, kmeans(features, k, seed=0)[0]))
    return [(name, evaluate(p, labels), sorted(torch.bincount(p, minlength=k).tolist())) for name, p in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = [
        "# SCL: classifier against k-means on its features",
        "",
        "```",
        command_line(),
        "```",
        "",
        machine_line(f"torch {torch.__version__}", f"{torch.get_num_threads()} threads") + ".",
        "",
        "| clusters from | ACC | NMI | ARI | cluster sizes, smallest to largest |",
        "|---|---|---|---|---|",
    ]
    for name, scores, sizes in diagnose(args.checkpoint):
        lines.append(
            f"| {name} | {scores['acc']:.4f} | {scores['nmi']:.4f} | {scores['ari']:.4f} | "
            f"{', '.join(map(str, sizes))} |"
        )
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
