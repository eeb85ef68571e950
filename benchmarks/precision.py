"""Training images/s at bf16 mixed precision against float32, each method's Fashion-MNIST step.

    python benchmarks/precision.py [--device cpu|cuda] [--steps 30] [--repeats 3] \
        [--methods CC SCL] [--out benchmarks/results/precision-<device>.md]

Each method as its experiments/<method>_fashion_mnist.yaml builds it, through Lightning's Trainer
(`--trainer.precision 32-true` against `bf16-mixed`: autocast to bfloat16 around the training
step, float32 weights). The two sides alternate and the median of the per-repeat ratios is
reported, so that a noisy machine skews both alike. On a CPU, bf16 pays where it has bfloat16
instructions (avx512_bf16 / AMX); the output records the CPU's flags for that reason.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import command_line, cpu, gpu, machine_line, write_report  # noqa: E402
from throughput import (  # noqa: E402
    METHODS,
    clusterlab_images_per_s,
    median_ratio,
    pretext_checkpoint,
    timed_fit,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=None, help="names as in throughput.METHODS")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    device = args.device
    lines = [
        f"# bf16 mixed precision against float32 ({device})",
        "",
        "```",
        command_line(),
        "```",
        "",
        machine_line(
            cpu(),
            gpu() if device == "cuda" else "no GPU",
            f"torch {torch.__version__}",
            f"torch threads {torch.get_num_threads()}",
        )
        + f". Batch 256, {args.steps} timed steps after 5 warm-up steps; medians of {args.repeats} "
        "alternating repeats, the ratio the median of the per-repeat ratios.",
        "",
        "| method | config | float32 img/s | bf16-mixed img/s | bf16 / float32 "
        "| backbone output dtype (fp32 / bf16 side) |",
        "|---|---|---|---|---|---|",
    ]
    scratch = Path(tempfile.mkdtemp())
    for name, (config, _) in METHODS.items():
        if args.methods and name not in args.methods:
            continue
        overrides = ["--trainer.accelerator", "gpu" if device == "cuda" else "cpu"]
        if "nnm" in config:
            overrides += ["--model.init_args.pretext_checkpoint", pretext_checkpoint(scratch)]
        bf16, fp32, ratio = median_ratio(
            lambda c=config, o=overrides: clusterlab_images_per_s(
                c, [*o, "--trainer.precision", "bf16-mixed"], device, args.steps, 5
            ),
            lambda c=config, o=overrides: clusterlab_images_per_s(
                c, [*o, "--trainer.precision", "32-true"], device, args.steps, 5
            ),
            args.repeats,
        )
        # What each side ran in, read off the backbone's output in a training step (not the label).
        ran = [
            "/".join(
                sorted(
                    str(d).replace("torch.", "")
                    for d in timed_fit(config, [*overrides, "--trainer.precision", p], device, 1, 1)[0].dtypes
                )
            )
            for p in ("32-true", "bf16-mixed")
        ]
        lines.append(
            f"| {name} | {config} | {fp32:,.0f} | {bf16:,.0f} | {ratio:.2f}x | {ran[0]} / {ran[1]} |"
        )
        print(lines[-1], flush=True)
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
