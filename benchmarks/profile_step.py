"""Where a training step's time goes, for the Fashion-MNIST configs on a CPU budget.

    python benchmarks/profile_step.py [--configs experiments/cc_fashion_mnist.yaml ...] \
        [--steps 20] [--repeats 3] [--out benchmarks/results/profile-step-cpu.md]

For each config, on its own batch of real Fashion-MNIST images (batch size from the config):
- views: the two random views of the batch (kornia, on the device);
- backbone: forward and backward of the backbone on both views;
- step: the whole training step inside clusterlab (Lightning Trainer, the real data module,
  heads, losses, gathers, optimizer), as images/s;
- the rest: step - views - backbone (heads, losses, optimizer, Lightning).
An epoch-end pass (val) over all 70,000 images is timed as well: `plain` views + the forward
of evaluation, the per-epoch cost that a time budget pays check_val_every_n_epoch-wise.

The configs are timed alternately, `repeats` times, and the medians are reported, so that a
noisy machine skews every config alike; the first config is the baseline of the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import command_line, machine_line, write_report  # noqa: E402
from throughput import _seconds, build, clusterlab_images_per_s, pretext_checkpoint  # noqa: E402


def parts(config: str, overrides: list[str], steps: int) -> dict[str, float]:
    """Seconds per step of the views and of the backbone (forward + backward), and of one pass of
    evaluation over the whole data set."""
    torch.manual_seed(0)
    model, data = build(config, overrides)
    model.train()
    data.setup("fit")
    images, batch = data.train_set.images, data.hparams.batch_size
    x = images[torch.randperm(len(images))[:batch]]
    model.views(x)  # warm-up
    views = statistics.median(_seconds(lambda: (model.views(x), model.views(x))) for _ in range(steps))
    x_a, x_b = model.views(x), model.views(x)

    def backbone() -> None:
        (model.backbone(x_a).sum() + model.backbone(x_b).sum()).backward()

    backbone()
    backbone_s = statistics.median(_seconds(backbone) for _ in range(steps))
    model.eval()
    with torch.no_grad():
        evaluation = _seconds(
            lambda: [model.evaluation_outputs(images[i : i + 1024]) for i in range(0, len(images), 1024)]
        )
    return {"views": views, "backbone": backbone_s, "eval_pass": evaluation, "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=[
            "experiments/cc_fashion_mnist.yaml",
            "experiments/simclr_fashion_mnist.yaml",
            "experiments/nnm_fashion_mnist.yaml",
            "experiments/scl_fashion_mnist.yaml",
            "experiments/dccm_fashion_mnist.yaml",
        ],
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    pretext = None
    if any("nnm" in Path(c).name for c in args.configs):  # NNM starts from a (any) SimCLR checkpoint
        folder = Path("/tmp/profile_step")
        folder.mkdir(exist_ok=True)
        pretext = pretext_checkpoint(folder)

    def overrides(config: str) -> list[str]:
        if "nnm" in Path(config).name:
            return [f"--model.init_args.pretext_checkpoint={pretext}"]
        return []

    measured: dict[str, list[dict[str, float]]] = {c: [] for c in args.configs}
    for _ in range(args.repeats):
        for config in args.configs:
            row = parts(config, overrides(config), args.steps)
            rate = clusterlab_images_per_s(config, overrides(config), "cpu", args.steps, 5)
            row["step_images_per_s"] = rate
            measured[config].append(row)

    def median(config: str, key: str) -> float:
        return statistics.median(r[key] for r in measured[config])

    baseline = median(args.configs[0], "step_images_per_s")
    lines = [
        "# Where a training step's time goes (Fashion-MNIST configs)",
        "",
        "```",
        command_line(),
        "```",
        "",
        machine_line(f"torch {torch.__version__}", f"{torch.get_num_threads()} threads", "no GPU")
        + f". Medians of {args.repeats} alternating repeats.",
        "",
        "| config | step, images/s | vs first | views, ms/step | backbone fwd+bwd, ms/step "
        "| the rest, ms/step | one eval pass, s |",
        "|---|---|---|---|---|---|---|",
    ]
    for config in args.configs:
        rate = median(config, "step_images_per_s")
        batch = measured[config][0]["batch"]
        step_ms = 1000 * batch / rate
        views, backbone = 1000 * median(config, "views"), 1000 * median(config, "backbone")
        lines.append(
            f"| {config} | {rate:,.0f} | {rate / baseline:.2f} | {views:.0f} | {backbone:.0f} | "
            f"{step_ms - views - backbone:.0f} | {median(config, 'eval_pass'):.1f} |"
        )
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
