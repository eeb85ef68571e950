"""RandAugment's cost per batch: the per-op slices of clusterlab.data.views.RandAugment against the
version it replaced, which ran every op on the whole batch and kept each image's own op (torch.where).

    python benchmarks/randaugment.py [--configs experiments/nnm_fashion_mnist.yaml ...] \
        [--repeats 20] [--out benchmarks/results/randaugment-cpu.md]

For each config, its own StrongViews ops and batch size, on real images of its data set (digits or
Fashion-MNIST), in this process: both versions timed alternately, the medians reported, the old one
as the baseline of the ratio. The old version is written out here (from commit 8751bc2) so that the
comparison survives it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import command_line, gpu, machine_line, write_report  # noqa: E402

from clusterlab.data.views import RANDAUGMENT_OPS, RandAugment  # noqa: E402


class WholeBatchRandAugment(RandAugment):
    """The version at 8751bc2: all ops on the whole batch, each image keeps its own (torch.where)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, device = len(images), images.device
        choice = torch.randint(len(self.ops), (n, self.num_ops), device=device)
        for step in range(self.num_ops):
            unit = torch.rand(n, device=device)
            sign = torch.randint(0, 2, (n,), device=device) * 2 - 1
            chosen, current = choice[:, step].view(-1, 1, 1, 1), images
            for k, (name, low, high) in enumerate(self.ops):
                op, _, _, symmetric = RANDAUGMENT_OPS[name]
                magnitude = low + (high - low) * unit
                if symmetric:
                    magnitude = magnitude * sign
                images = torch.where(chosen == k, op(current, magnitude).clamp(0.0, 1.0), images)
        return images


def batch_of(config: dict) -> torch.Tensor:
    data = config["data"]
    if data.get("dataset") == "fashion_mnist":
        from clusterlab.data.sources import FashionMNIST as Source
    else:
        from clusterlab.data.sources import Digits as Source
    images = Source().load("train+test").images
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: data["batch_size"]]
    return images[pick].float() / 255


def ms(module: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    module(x)
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=["experiments/nnm_fashion_mnist.yaml", "experiments/nnm_digits.yaml"]
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = [
        "# RandAugment per batch: per-op slices vs every op on the whole batch",
        "",
        "```",
        command_line(),
        "```",
        "",
        machine_line(gpu(), f"{torch.get_num_threads()} threads", f"torch {torch.__version__}")
        + f". Medians of {args.repeats} alternating calls.",
        "",
        "| config | batch | ops x steps | whole batch (old), ms | per-op slices (new), ms | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for path in args.configs:
        config = yaml.safe_load(Path(path).read_text())
        views = config["model"]["init_args"]["views"]["init_args"]
        ops = {name: tuple(r) if r else None for name, r in (views.get("ops") or {}).items()} or None
        old, new = WholeBatchRandAugment(views["num_ops"], ops), RandAugment(views["num_ops"], ops)
        x = batch_of(config)
        old(x), new(x)  # warm-up
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.repeats):
            times["old"].append(ms(old, x))
            times["new"].append(ms(new, x))
        before, after = statistics.median(times["old"]), statistics.median(times["new"])
        lines.append(
            f"| {path} | {tuple(x.shape)} | {len(new.ops)} x {new.num_ops} | {before:.1f} | {after:.1f} "
            f"| {before / after:.2f}x |"
        )
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
