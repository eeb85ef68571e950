"""CC's training step in clusterlab against the CC paper's pipeline as its authors built it, side by side.

    python benchmarks/cc_authors.py [--steps 6] [--warmup 2] [--repeats 3] [--workers 2] \
        [--data_root /usr/share/datasets/fashion-mnist] [--out benchmarks/results/cc-authors-cpu.md]

Both sides train the same network on the same images: ResNet-18 with the CIFAR stem (3x3 stride-1
conv, no max-pool; torchvision's ResNet-18 otherwise) on 1-channel input, two 32 px views of each of
128 Fashion-MNIST training images per step, CC's instance head (512-512-128) and cluster head
(512-512-10, softmax), the paper's losses (Eqs. 1-6: instance NT-Xent at 0.5, cluster NT-Xent at 1.0,
minus the assignment entropy), Adam at 3e-4.

- The authors' pipeline ("Contrastive Clustering", Li et al., AAAI 2021, arXiv:2009.09687; their
  public code's structure, written here from scratch): a Dataset that makes a PIL image of each
  sample and applies torchvision transforms twice (RandomResizedCrop(32), horizontal flip,
  ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, RandomGrayscale with p 0.2, ToTensor), DataLoader
  workers, the two views through the network one after the other, float32, NCHW.
- clusterlab: `clusterlab fit --config experiments/cc_cifar10.yaml` with the overrides printed below
  (the same network, heads, losses and optimizer; the same augmentations as they act on grey
  images: crop, flip, brightness and contrast jitter), timed inside Lightning's loop: views made on
  the device in one batched call per view, bf16-mixed as in the GPU configs, channels_last (the
  `Speed` callback's "auto" under bf16). The float32 row (the authors' precision) shows how much of
  the ratio is the pipeline and how much the precision.

The sides alternate and the median of the per-repeat ratios is reported.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import command_line, cpu, machine_line, write_report  # noqa: E402
from throughput import (
    PILViews,  # noqa: E402
    timed_fit,  # noqa: E402
)
from throughput import sync as synchronize  # noqa: E402

from clusterlab.losses.cc import cluster_entropy, cluster_loss, instance_loss  # noqa: E402

CONFIG = "experiments/cc_cifar10.yaml"


def clusterlab_overrides(root: str, batch: int, precision: str) -> list[str]:
    """`clusterlab fit --config experiments/cc_cifar10.yaml` in the authors' setting on Fashion-MNIST."""
    views = {
        "class_path": "clusterlab.data.views.SmallImageViews",
        "init_args": {
            "size": 32,
            "crop_scale": [0.08, 1.0],
            "flip": True,
            "brightness": 0.4,
            "contrast": 0.4,
            "jitter_p": 0.8,
            "rotation": 0.0,
            "translate": 0.0,
            "scale": [1.0, 1.0],
            "noise_std": 0.0,
            "erasing": None,
            "mean": None,  # not carried over from a config's colour views (jsonargparse keeps shared keys)
            "std": None,
        },
    }
    return [
        "--data.dataset=fashion_mnist",
        f"--data.root={root}",
        "--data.train_split=train",
        f"--data.batch_size={batch}",
        "--trainer.devices=1",
        "--trainer.sync_batchnorm=false",
        f"--trainer.precision={precision}",
        "--model.init_args.backbone.init_args.depth=18",
        f"--model.init_args.views={json.dumps(views)}",
    ]


# -- the authors' pipeline -------------------------------------------------------------------------


class AuthorsCC(nn.Module):
    """torchvision's ResNet-18 (CIFAR stem, 1 channel) with CC's two heads."""

    def __init__(self, num_clusters: int = 10) -> None:
        import torchvision

        super().__init__()
        resnet = torchvision.models.resnet18(weights=None)
        resnet.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
        resnet.maxpool, resnet.fc = nn.Identity(), nn.Identity()
        self.resnet = resnet
        self.instance_projector = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
        self.cluster_projector = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, num_clusters), nn.Softmax(dim=1)
        )

    def forward(self, x_i: torch.Tensor, x_j: torch.Tensor):
        h_i, h_j = self.resnet(x_i), self.resnet(x_j)
        z_i = F.normalize(self.instance_projector(h_i), dim=1)
        z_j = F.normalize(self.instance_projector(h_j), dim=1)
        return z_i, z_j, self.cluster_projector(h_i), self.cluster_projector(h_j)


def authors_images_per_s(
    images: torch.Tensor, batch: int, workers: int, steps: int, warmup: int, device: str = "cpu"
) -> float:
    """Training images/s of the authors' loop over `steps` steps after `warmup` (worker start-up excluded)."""
    torch.manual_seed(0)
    model = AuthorsCC().to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    loader = torch.utils.data.DataLoader(
        PILViews(images), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True
    )
    start = None
    for step, (x_i, x_j) in enumerate(loader):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        if step == warmup + steps:
            break
        x_i, x_j = x_i.to(device, non_blocking=True), x_j.to(device, non_blocking=True)
        z_i, z_j, c_i, c_j = model(x_i, x_j)
        loss = instance_loss(z_i, z_j, 0.5) + cluster_loss(c_i, c_j, 1.0) - cluster_entropy(c_i, c_j)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def clusterlab_run(root: str, batch: int, precision: str, steps: int, warmup: int, layout: str = "auto"):
    """clusterlab's images/s and what ran: the backbone's output dtypes and the Speed settings."""
    overrides = [*clusterlab_overrides(root, batch, precision), f"--speed.channels_last={layout}"]
    timer, trainer = timed_fit(CONFIG, overrides, "cpu", steps, warmup)
    speed = next(c for c in trainer.callbacks if type(c).__name__ == "Speed")
    return timer.images / timer.seconds, timer.dtypes, dict(speed.applied)


def load_images(root: str) -> torch.Tensor:
    """The Fashion-MNIST training images, read by the same reader as clusterlab's data module."""
    from clusterlab.data.sources import FashionMNIST

    return FashionMNIST(root).load("train").images


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    images = load_images(args.data_root)
    sides = {  # name: (precision, channels_last); "auto" is the default: on under bf16
        "bf16": ("bf16-mixed", "auto"),
        "bf16_nchw": ("bf16-mixed", "false"),
        "fp32": ("32-true", "auto"),
    }
    speeds: dict[str, list[float]] = {"authors": [], **{name: [] for name in sides}}
    ran = {}
    for _ in range(args.repeats):  # alternating, so that a noisy machine skews all sides alike
        speeds["authors"].append(
            authors_images_per_s(images, args.batch, args.workers, args.steps, args.warmup)
        )
        for name, (precision, layout) in sides.items():
            speed, dtypes, applied = clusterlab_run(
                args.data_root, args.batch, precision, args.steps, args.warmup, layout
            )
            speeds[name].append(speed)
            ran[name] = (dtypes, applied)
    result = {
        **{name: statistics.median(values) for name, values in speeds.items()},
        **{
            f"ratio_{name}": statistics.median(a / b for a, b in zip(speeds[name], speeds["authors"]))
            for name in sides
        },
        "ran": ran,
    }
    write_report(markdown(args, argv, result), args.out)
    return result


def markdown(args, argv, result: dict) -> str:
    command = command_line(None if argv is None else ["benchmarks/cc_authors.py", *argv])
    overrides = clusterlab_overrides(args.data_root, args.batch, "bf16-mixed")

    def ran(side: str) -> str:
        dtypes, applied = result["ran"][side]
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        return f"backbone output {names}; channels_last {applied['channels_last']}"

    return "\n".join(
        [
            "# CC's training step: clusterlab vs the authors' pipeline (CPU)",
            "",
            "```",
            command,
            "```",
            "",
            machine_line(
                cpu(),
                "no GPU",
                f"torch {torch.__version__}",
                f"torch threads {torch.get_num_threads()}",
                f"{args.workers} DataLoader workers on the authors' side",
            )
            + f". Medians of {args.repeats} alternating repeats of {args.steps} steps after "
            f"{args.warmup} warm-up steps; a ratio is the median of the per-repeat ratios.",
            "",
            f"Same network (ResNet-18, CIFAR stem, 1 channel), 32 px, batch {args.batch} x 2 views, "
            "Fashion-MNIST training images, CC's heads and losses, Adam 3e-4. clusterlab is "
            f"`clusterlab fit --config {CONFIG}` with `{shlex.join(overrides[:-1])}` and the views "
            "`SmallImageViews(size=32, crop_scale=[0.08, 1], flip, brightness 0.4, contrast 0.4, p 0.8)`.",
            "",
            "| pipeline | what ran | images/s | / authors |",
            "|---|---|---|---|",
            f"| the authors' (PIL views in workers, float32, NCHW) | float32 | {result['authors']:,.1f} "
            "| 1.00x |",
            f"| clusterlab, float32 | {ran('fp32')} | {result['fp32']:,.1f} | {result['ratio_fp32']:.2f}x |",
            f"| clusterlab, bf16-mixed, NCHW | {ran('bf16_nchw')} | {result['bf16_nchw']:,.1f} | "
            f"{result['ratio_bf16_nchw']:.2f}x |",
            f"| **clusterlab, bf16-mixed** (as the GPU configs; channels_last by default under bf16) | "
            f"{ran('bf16')} | {result['bf16']:,.1f} | **{result['ratio_bf16']:.2f}x** |",
            "",
        ]
    )


if __name__ == "__main__":
    main()
