"""Throughput of clusterlab against the plain ways, measured in one process (ratios, not absolutes).

    python benchmarks/throughput.py [--device cpu|cuda] [--steps 30] \
        [--out benchmarks/results/throughput-<device>.md]

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
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import command_line, gpu, machine_line, write_report  # noqa: E402

from clusterlab.data.views import SimCLRViews  # noqa: E402
from clusterlab.losses.cc import cluster_entropy, cluster_loss, instance_loss  # noqa: E402
from clusterlab.losses.common import nt_xent  # noqa: E402
from clusterlab.losses.dccm import (  # noqa: E402
    mutual_information_loss,
    pseudo_graph,
    pseudo_graph_loss,
    pseudo_label_loss,
    pseudo_labels,
    triplet_pairs,
)
from clusterlab.losses.nnm import class_contrastive_loss, consistency_loss, entropy_loss  # noqa: E402
from clusterlab.losses.scl import concept_loss, contrastive_set, hard_sample_weights, memory_logits  # noqa: E402
from clusterlab.losses.scl import instance_loss as scl_instance_loss  # noqa: E402
from clusterlab.neighbors import knn  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- a) a method's step in clusterlab vs a bare loop ----------------------------------------------


class StepTimer(pl.Callback):
    """Wall time of the training steps after `warmup`, measured inside Lightning's loop."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds, self.images = warmup, None, 0.0, 0
        self.dtypes: set[torch.dtype] = set()  # of the backbone's output in the training steps: what ran
        self._hook = None

    def on_train_start(self, trainer, module):
        def record(_module, _inputs, output):  # DCCM's backbone also returns its shallow map
            self.dtypes.add((output[0] if isinstance(output, tuple) else output).dtype)

        self._hook = module.backbone.register_forward_hook(record)

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
        if self._hook is not None:
            self._hook.remove()


def build_cli(config: str, overrides: list[str]):
    """The parsed and built `clusterlab fit --config <config> <overrides>` (its run folder goes to a
    scratch --runs_dir): the method, the data module and the trainer settings, as a fit gets them."""
    import tempfile

    from clusterlab.cli import ClusterLabCLI

    scratch = tempfile.mkdtemp(prefix="clusterlab-benchmark-")
    args = ["--config", config, "--trainer.logger", "false", "--runs_dir", scratch, *overrides]
    return ClusterLabCLI(args=args, run=False)


def speed_settings(cli):
    """The run's `Speed` callback (channels_last, cuDNN autotuning, TF32, compile) as the config sets it."""
    from clusterlab.callbacks.speed import Speed

    return next(c for c in cli.trainer.callbacks if isinstance(c, Speed))


def build(config: str, overrides: list[str]):
    """A method and its data module, exactly as `clusterlab fit --config <config>` builds them."""
    cli = build_cli(config, overrides)
    return cli.model, cli.datamodule


def timed_fit(config: str, overrides: list[str], device: str, steps: int, warmup: int):
    """`warmup + steps` training steps of the config under a lean Trainer that takes its precision
    from the same parsed config as `clusterlab fit` (so `--trainer.precision bf16-mixed` is what
    runs); returns the StepTimer (images, seconds, the dtypes that ran) and the Trainer."""
    torch.manual_seed(0)
    cli = build_cli(config, overrides)
    timer = StepTimer(warmup)
    speed = speed_settings(cli)
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=cli.config.trainer.precision,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer, speed],  # the config's layout, cuDNN, TF32 and compile settings
    )
    trainer.fit(cli.model, cli.datamodule)
    return timer, trainer


def cc_bare_step(model, batch: dict, optimizer) -> torch.Tensor:
    """CC's step written out with no framework: the work clusterlab's training_step does."""
    x = batch["image"]
    x_a, x_b = model.views(x), model.views(x)
    h_a, h_b = model.backbone(x_a), model.backbone(x_b)
    z_a, z_b = model.instance_projector(h_a), model.instance_projector(h_b)
    y_a, y_b = model.cluster_head(h_a)[0].softmax(-1), model.cluster_head(h_b)[0].softmax(-1)
    loss = instance_loss(z_a, z_b, 0.5) + cluster_loss(y_a, y_b, 1.0) - cluster_entropy(y_a, y_b)
    return _update(loss, optimizer)


def simclr_bare_step(model, batch: dict, optimizer) -> torch.Tensor:
    x = batch["image"]
    u = model.contrastive_head(model.backbone(model.views(x)))
    u_prime = model.contrastive_head(model.backbone(model.views(x)))
    return _update(nt_xent(u, u_prime, model.hparams.temperature), optimizer)


def nnm_bare_step(model, batch: dict, optimizer) -> torch.Tensor:
    """NNM's first-epoch step (the global terms start in the second epoch, in both loops)."""

    def assign(images):
        return model.cluster_head(model.backbone(model.views(images))).softmax(-1)

    x = batch["image"]
    f = model.backbone(model.views(x))
    p = model.cluster_head(f).softmax(-1)
    p_aug, n_pre = assign(x), assign(batch["neighbor_image"])
    n_local = p[:, knn(f.detach(), 1)[0][:, 0]]
    a, positives = torch.cat([p, p_aug], 1), torch.cat([n_pre, n_local], 1)
    hp = model.hparams
    loss = sum(
        consistency_loss(a[h], positives[h])
        + class_contrastive_loss(a[h], positives[h], hp.temperature)
        + hp.entropy_weight * entropy_loss(a[h])
        for h in range(len(a))
    )
    return _update(loss, optimizer)


def scl_bare_step(model, batch: dict, optimizer) -> torch.Tensor:
    """SCL's step with its callbacks' work: the momentum update and the enqueueing of the keys."""
    hp, x, index = model.hparams, batch["image"], batch["index"]
    h = model.backbone(model.views(x))
    with torch.no_grad():
        h_perturbed = model.momentum_encoder["backbone"](model.views(x))
    weights = hard_sample_weights(model.sample_table.changes[0][index])
    loss, pending = 0.0, []
    for row, task in enumerate(model.tasks):
        q = model.projections[task](h)
        with torch.no_grad():
            k = F.normalize(model.momentum_encoder["projections"][task](h_perturbed), dim=1)
        memory = model.semantic_memory[task]
        if task == "over_clustering":
            own, queue, owner = index, torch.zeros_like(index), memory.index.flatten()
        else:
            own = queue = model.sample_table.labels[row][index]
            owner = memory.queue_of_slot()
        loss = loss + scl_instance_loss(
            q, k, memory.flat_keys(), contrastive_set(owner, own), hp.temperature, weights
        )
        if task != "over_clustering":
            target = memory_logits(q.detach(), memory.keys, hp.temperature).softmax(1)
            loss = loss + concept_loss(model.classifier_logits(task, q), target)
        pending.append((memory, k, queue))
    loss = _update(loss, optimizer)
    with torch.no_grad():
        m = hp.momentum
        for name, target in model.momentum_encoder.items():
            torch._foreach_lerp_(
                list(target.parameters()), [p.detach() for p in getattr(model, name).parameters()], 1 - m
            )
        for memory, k, queue in pending:
            memory.enqueue(k, queue, index)
    return loss


def dccm_bare_step(model, batch: dict, optimizer) -> torch.Tensor:
    """DCCM's step (Eq. 15): original and transformed images, pseudo-graph, pseudo labels, triplet MI."""
    hp, x = model.hparams, batch["image"]
    logits, _ = model.forward_with_shallow(model.views.plain(x))
    logits = logits[0]  # the one head
    probs = logits.detach().float().softmax(1)
    graph = pseudo_graph(probs, hp.graph_threshold)
    labels, confident = pseudo_labels(probs, hp.label_threshold)
    loss = pseudo_graph_loss(logits, graph) + hp.alpha * pseudo_label_loss(logits, labels, confident)
    logits, shallow = model.forward_with_shallow(model.views(x))
    logits = logits[0]
    loss = loss + pseudo_graph_loss(logits, graph) + hp.alpha * pseudo_label_loss(logits, labels, confident)
    scores = torch.rand(len(x), len(x), device=x.device)
    positive, positive_valid, negatives, negatives_valid = triplet_pairs(graph, scores, hp.num_negatives)
    anchor = torch.arange(len(x), device=x.device)
    joint = (torch.cat([anchor, anchor[positive_valid]]), torch.cat([anchor, positive[positive_valid]]))
    marginal = (anchor[:, None].expand_as(negatives)[negatives_valid], negatives[negatives_valid])
    rows, cols = torch.cat([joint[0], marginal[0]]), torch.cat([joint[1], marginal[1]])
    t = model.discriminators[0](logits.index_select(0, rows), shallow.index_select(0, cols))
    loss = loss + hp.beta * mutual_information_loss(t[: len(joint[0])], t[len(joint[0]) :])
    return _update(loss, optimizer)


def _update(loss: torch.Tensor, optimizer) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def pretext_checkpoint(folder: Path) -> str:
    """An (untrained) SimCLR checkpoint for NNM to start from: throughput does not depend on its weights."""
    model, data = build("experiments/simclr_fashion_mnist.yaml", [])
    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=str(folder),
        enable_checkpointing=False,
    )
    trainer.fit(model, data)
    path = folder / "simclr.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


# method: (config, bare step); Fashion-MNIST (70,000 training images: the timed steps stay inside
# the first epoch, so no epoch-end work is timed on either side).
METHODS = {
    "CC": ("experiments/cc_fashion_mnist.yaml", cc_bare_step),
    "SimCLR (NNM's pretext)": ("experiments/simclr_fashion_mnist.yaml", simclr_bare_step),
    "NNM": ("experiments/nnm_fashion_mnist.yaml", nnm_bare_step),
    "SCL": ("experiments/scl_fashion_mnist.yaml", scl_bare_step),
    "DCCM": ("experiments/dccm_fashion_mnist.yaml", dccm_bare_step),
}


def clusterlab_images_per_s(config: str, overrides: list[str], device: str, steps: int, warmup: int) -> float:
    timer, _ = timed_fit(config, overrides, device, steps, warmup)
    return timer.images / timer.seconds


def bare_images_per_s(
    config: str, overrides: list[str], bare_step, device: str, steps: int, warmup: int
) -> float:
    torch.manual_seed(0)
    cli = build_cli(config, overrides)
    model, data = cli.model, cli.datamodule
    speed_settings(cli).apply(model, torch.device(device), str(cli.config.trainer.precision))
    model = model.to(device).train()
    optimizer = model.build_optimizer(model.parameters())
    data.setup("fit")
    images, batch = data.train_set.images, data.hparams.batch_size
    if hasattr(model, "sample_table"):  # SCL's pseudo labels, as its setup("fit") makes them
        model.sample_table.reset(len(images), model.task_clusters, torch.Generator().manual_seed(0))
        model.sample_table.to(device)
    order = torch.randperm(len(images))
    neighbors = torch.randint(len(images), (len(images), 20))  # any table costs the same to draw from
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        picks = order[step * batch : (step + 1) * batch]
        drawn = neighbors[picks, torch.randint(20, (len(picks),))]
        bare_step(
            model,
            {
                "image": images[picks].to(device, non_blocking=True),
                "index": picks.to(device),
                "neighbor_image": images[drawn].to(device, non_blocking=True),
            },
            optimizer,
        )
    sync(device)
    return steps * batch / (time.perf_counter() - start)


# -- b) views on the device vs PIL transforms in DataLoader workers --------------------------------


class PILViews(torch.utils.data.Dataset):
    """The authors' style: two SimCLR views per image, PIL transforms, one image at a time."""

    def __init__(self, images: torch.Tensor) -> None:
        from torchvision import transforms as T

        # N x H x W x C; grey images as N x H x W (PIL "L"): the transforms act on them as the
        # authors' pipeline does on a grey data set
        self.images = images.permute(0, 2, 3, 1).numpy() if images.shape[1] > 1 else images[:, 0].numpy()
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(32, scale=(0.08, 1.0)),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.ToTensor(),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        image = Image.fromarray(self.images[i])
        return self.transform(image), self.transform(image)


def pil_views_per_s(images: torch.Tensor, batch: int, workers: int, device: str) -> float:
    loader = torch.utils.data.DataLoader(
        PILViews(images),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=False,
    )
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
        x = data[(k * batch) % (len(data) - batch) :][:batch]
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
    parser.add_argument(
        "--knn_repeats", type=int, default=1, help="the search is deterministic work: one run each"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    import warnings

    warnings.filterwarnings("ignore")
    lines = [
        f"# Throughput ({device})",
        "",
        "```",
        command_line(),
        "```",
        "",
        machine_line(
            gpu() if device == "cuda" else "no GPU",
            f"torch {torch.__version__}",
            f"torch threads {torch.get_num_threads()}",
        )
        + f". Medians of {args.repeats} alternating repeats; a ratio is the median of the per-repeat "
        "ratios (both sides back to back), not the ratio of the medians.",
        "",
    ]

    lines += [
        "## a) Training step: clusterlab vs a bare PyTorch loop (same model, views, loss)",
        "",
        "Each method as its experiments/<method>_fashion_mnist.yaml builds it (batch 256); timed "
        f"over {args.steps} steps after 5 warm-up steps, inside the first epoch.",
        "",
        "| method | config | clusterlab img/s | bare loop img/s | clusterlab / bare |",
        "|---|---|---|---|---|",
    ]
    import tempfile

    scratch = Path(tempfile.mkdtemp())
    for name, (config, bare_step) in METHODS.items():
        overrides = ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu"]
        if "nnm" in config:
            overrides += ["--model.init_args.pretext_checkpoint", pretext_checkpoint(scratch)]
        ours, bare, ratio = median_ratio(
            lambda c=config, o=overrides: clusterlab_images_per_s(c, o, device, args.steps, 5),
            lambda c=config, o=overrides, s=bare_step: bare_images_per_s(c, o, s, device, args.steps, 5),
            args.repeats,
        )
        lines.append(f"| {name} | {config} | {ours:,.0f} | {bare:,.0f} | {ratio:.3f} |")
        print(lines[-1], flush=True)

    images = torch.randint(0, 256, (4096, 3, 32, 32), dtype=torch.uint8)
    workers = max(1, (os.cpu_count() or 2))
    on_device, pil, ratio = median_ratio(
        lambda: device_views_per_s(images, 256, device, 12),
        lambda: pil_views_per_s(images, 256, workers, device),
        args.repeats,
    )
    lines += [
        "",
        "## b) SimCLR views of 32 px colour images, two views per image",
        "",
        "| views | images/s |",
        "|---|---|",
        f"| on the device ({device}), batched, kornia | {on_device:,.0f} |",
        f"| PIL transforms in {workers} DataLoader workers (the authors' style) | {pil:,.0f} |",
        f"| **ratio** | **{ratio:.2f}x** |",
    ]
    print(lines[-3:], flush=True)

    features = torch.randn(args.knn_n, 512, generator=torch.Generator().manual_seed(0)).to(device)
    faiss_s, torch_s, _ = median_ratio(
        lambda: _seconds(lambda: knn(features, 20, backend="faiss"), device),
        lambda: _seconds(lambda: knn(features, 20, backend="torch"), device),
        args.knn_repeats,
    )
    check = features[:2000]
    agree = (
        knn(check, 20, backend="faiss")[0].sort(1).values == knn(check, 20, backend="torch")[0].sort(1).values
    )
    lines += [
        "",
        f"## c) kNN, k = 20, {args.knn_n:,} x 512 features",
        "",
        "| search | seconds |",
        "|---|---|",
        f'| knn(backend="faiss") | {faiss_s:.2f} |',
        f'| knn(backend="torch"): matmul + topk on {device} | {torch_s:.2f} |',
        f"| **torch / faiss** | **{torch_s / faiss_s:.2f}x** |",
        "",
        f"Both find the same neighbours: {float(agree.float().mean()):.4f} of the top-20 agree on a "
        "2,000-row check.",
    ]
    print("\n".join(lines[-7:]), flush=True)

    write_report("\n".join(lines) + "\n", args.out or f"benchmarks/results/throughput-{device}.md")


def _seconds(fn, device: str = "cpu") -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
