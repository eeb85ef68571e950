"""Throughput of clusterlab against the plain ways, measured in one process (ratios, not absolutes).

    python benchmarks/throughput.py [--device cpu|cuda] [--steps 30] [--out benchmarks/results/throughput-<device>.md]

a) Training images/s of each method's step inside clusterlab (Lightning Trainer, the real data
   module, logging, NaN guard, per-step reseeding) against a bare PyTorch loop doing the same work
   with the same modules, views and loss functions. Target: clusterlab within 5%.
b) SimCLR views for 32 px colour images made on the device in one batched call (kornia, per-sample
   parameters) against the authors' style: PIL transforms per image in DataLoader workers.
c) k nearest neighbours (k = 20) of 70,000 x 512 features: the kNN helper's faiss backend against
   its torch backend (blocked matrix product + topk on the device).

The timings alternate between the two sides, and the median of the repeats is reported, so that
a noisy machine skews both sides alike. The output records the command, the machine and every
figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clusterlab.data.datamodule import ClusterDataModule  # noqa: E402
from clusterlab.data.views import SimCLRViews, SmallImageViews  # noqa: E402
from clusterlab.losses.cc import cluster_entropy, cluster_loss, instance_loss  # noqa: E402
from clusterlab.methods import CC  # noqa: E402
from clusterlab.neighbors import knn  # noqa: E402
from clusterlab.nn import SmallCNN  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- a) a method's step in clusterlab vs a bare loop ----------------------------------------------


class StepTimer(pl.Callback):
    """Wall time of the training steps after `warmup`, measured inside Lightning's loop."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds, self.images = warmup, None, 0.0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            sync(module.device.type)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.start is not None:
            self.images += len(batch["index"])

    def on_train_end(self, trainer, module):
        sync(module.device.type)
        self.seconds = time.perf_counter() - self.start


def cc_model() -> CC:
    backbone = SmallCNN(1, (32, 64, 128), (False, True, False))
    return CC(10, backbone, SmallImageViews(), optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))


def cc_bare_step(model: CC, x: torch.Tensor, optimizer) -> torch.Tensor:
    """CC's step written out with no framework: the work clusterlab's training_step does."""
    x_a, x_b = model.views(x), model.views(x)
    h_a, h_b = model.backbone(x_a), model.backbone(x_b)
    z_a, z_b = model.instance_projector(h_a), model.instance_projector(h_b)
    y_a, y_b = model.cluster_projector(h_a)[0].softmax(-1), model.cluster_projector(h_b)[0].softmax(-1)
    loss = instance_loss(z_a, z_b, 0.5) + cluster_loss(y_a, y_b, 1.0) - cluster_entropy(y_a, y_b)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


METHODS = {"CC": (cc_model, cc_bare_step, "digits")}


def clusterlab_images_per_s(build, dataset: str, device: str, steps: int, warmup: int, batch: int) -> float:
    torch.manual_seed(0)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=warmup + steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[timer])  # fmt: skip
    trainer.fit(build(), ClusterDataModule(dataset, batch_size=batch))
    return timer.images / timer.seconds


def bare_images_per_s(build, bare_step, dataset: str, device: str, steps: int, warmup: int, batch: int) -> float:
    torch.manual_seed(0)
    model = build().to(device).train()
    optimizer = model.build_optimizer(model.parameters())
    data = ClusterDataModule(dataset, batch_size=batch)
    data.setup("fit")
    images = data.train_set.images
    order = torch.randperm(len(images))
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        if (step + 1) * batch > len(order):
            order = torch.randperm(len(images))
        picks = order[(step * batch) % (len(order) - batch + 1):][:batch]
        bare_step(model, images[picks].to(device, non_blocking=True), optimizer)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


# -- b) views on the device vs PIL transforms in DataLoader workers --------------------------------


class PILViews(torch.utils.data.Dataset):
    """The authors' style: two SimCLR views per image, PIL transforms, one image at a time."""

    def __init__(self, images: torch.Tensor) -> None:
        from torchvision import transforms as T

        self.images = images.permute(0, 2, 3, 1).numpy()
        self.transform = T.Compose([
            T.RandomResizedCrop(32, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2), T.ToTensor(),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        image = Image.fromarray(self.images[i])
        return self.transform(image), self.transform(image)


def pil_views_per_s(images: torch.Tensor, batch: int, workers: int, device: str) -> float:
    loader = torch.utils.data.DataLoader(PILViews(images), batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=False)  # fmt: skip
    count, start = 0, None
    for k, (a, b) in enumerate(loader):
        a, b = a.to(device), b.to(device)
        if k == 1:  # after the workers' start-up
            sync(device)
            start, count = time.perf_counter(), 0
        count += len(a)
    sync(device)
    return count / (time.perf_counter() - start)


def device_views_per_s(images: torch.Tensor, batch: int, device: str, rounds: int) -> float:
    views = SimCLRViews(size=32, strength=0.5).to(device)
    data = images.to(device)
    views(data[:batch]), views(data[:batch])
    sync(device)
    start = time.perf_counter()
    for k in range(rounds):
        x = data[(k * batch) % (len(data) - batch):][:batch]
        views(x), views(x)
    sync(device)
    return rounds * batch / (time.perf_counter() - start)


# -- main ----------------------------------------------------------------------------------------


def median_ratio(fast, slow, repeats: int) -> tuple[float, float, float]:
    """Run the two sides alternately `repeats` times; medians of each and of the ratio."""
    a, b = [], []
    for _ in range(repeats):
        a.append(fast())
        b.append(slow())
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--knn_n", type=int, default=70_000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    import warnings

    warnings.filterwarnings("ignore")
    lines = [f"# Throughput ({device})", "", "```", "python " + shlex.join(sys.argv), "```", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"{torch.cuda.get_device_name(0) if device == 'cuda' else 'no GPU'}; torch {torch.__version__}, "
             f"torch threads {torch.get_num_threads()}. Medians of {args.repeats} alternating repeats.", ""]  # fmt: skip

    lines += ["## a) Training step: clusterlab vs a bare PyTorch loop (same model, views, loss)", "",
              "| method | data | batch | clusterlab img/s | bare loop img/s | clusterlab / bare |", "|---|---|---|---|---|---|"]
    for name, (build, bare_step, dataset) in METHODS.items():
        ours, bare, ratio = median_ratio(
            lambda b=build, d=dataset: clusterlab_images_per_s(b, d, device, args.steps, 5, 256),
            lambda b=build, s=bare_step, d=dataset: bare_images_per_s(b, s, d, device, args.steps, 5, 256),
            args.repeats)
        lines.append(f"| {name} | {dataset} | 256 | {ours:,.0f} | {bare:,.0f} | {ratio:.3f} |")
        print(lines[-1], flush=True)

    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
    workers = max(1, (os.cpu_count() or 2))
    on_device, pil, ratio = median_ratio(lambda: device_views_per_s(images, 256, device, 12),
                                         lambda: pil_views_per_s(images, 256, workers, device), args.repeats)  # fmt: skip
    lines += ["", "## b) SimCLR views of 32 px colour images, two views per image", "",
              "| views | images/s |", "|---|---|",
              f"| on the device ({device}), batched, kornia | {on_device:,.0f} |",
              f"| PIL transforms in {workers} DataLoader workers (the authors' style) | {pil:,.0f} |",
              f"| **ratio** | **{ratio:.2f}x** |"]  # fmt: skip
    print(lines[-3:], flush=True)

    features = torch.randn(args.knn_n, 512, generator=torch.Generator().manual_seed(0)).to(device)
    faiss_s, torch_s, _ = median_ratio(lambda: _seconds(lambda: knn(features, 20, backend="faiss"), device),
                                       lambda: _seconds(lambda: knn(features, 20, backend="torch"), device),
                                       args.repeats)  # fmt: skip
    check = features[:2000]
    agree = (knn(check, 20, backend="faiss")[0].sort(1).values == knn(check, 20, backend="torch")[0].sort(1).values)
    lines += ["", f"## c) kNN, k = 20, {args.knn_n:,} x 512 features", "", "| search | seconds |", "|---|---|",
              f"| knn(backend=\"faiss\") | {faiss_s:.2f} |", f"| knn(backend=\"torch\"): matmul + topk on {device} | {torch_s:.2f} |",
              f"| **torch / faiss** | **{torch_s / faiss_s:.2f}x** |", "",
              f"Both find the same neighbours: {float(agree.float().mean()):.4f} of the top-20 agree on a "
              "2,000-row check."]  # fmt: skip
    print("\n".join(lines[-7:]), flush=True)

    text = "\n".join(lines) + "\n"
    out = Path(args.out or f"benchmarks/results/throughput-{device}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


def _seconds(fn, device: str = "cpu") -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
