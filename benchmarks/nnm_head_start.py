"""NNM on Fashion-MNIST from random heads and from the k-means start, side by side from one pretext.

For each seed: the SimCLR pretext once (experiments/simclr_fashion_mnist.yaml, its 8 epochs, 2
threads), then two NNM runs of experiments/nnm_fashion_mnist.yaml (its 5 epochs) at the same time,
one thread each, from that pretext: the paper's random heads, and `head_init_epoch 0` (every head
starts at a spherical k-means of the pretext features, the best of 10 k-means runs per head). With
`--variants`, other starts too: `kmeans-diverse` (`head_init_restarts 1`: each head its own single
k-means run, so that the heads start in different optima and the lowest-loss one is chosen among
them). Epochs, not minutes: the runs share the machine, so a time budget would measure the sharing.
Labels only report.

    python benchmarks/nnm_head_start.py --work DIR --seeds 0 1 2
    python benchmarks/nnm_head_start.py --work DIR --seeds 0 1 2 --variants kmeans kmeans-diverse
    python benchmarks/nnm_head_start.py --work DIR --seeds 0 1 2 --collect   # tables from DIR only

Writes DIR/nnm_head_start.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import command_line, gpu, machine  # noqa: E402 - the module beside this one

REPO = Path(__file__).resolve().parents[1]
# name: (its column title, its flags over experiments/nnm_fashion_mnist.yaml). Each variant states
# every head-start flag it depends on, so that a change of the config's own values leaves it as named.
START = ["--model.init_args.head_init_epoch", "0", "--model.init_args.head_init_restarts"]
VARIANTS = {
    "random": ("random heads", ["--model.init_args.head_init_epoch", "null"]),
    "kmeans": ("k-means start", [*START, "10"]),
    "kmeans-diverse": ("k-means start, 1 run a head", [*START, "1"]),
}


def fit(config: str, seed: int, runs: Path, threads: int, extra: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "clusterlab", "fit", "--config", config, "--seed_everything", str(seed)]
    command += ["--runs_dir", str(runs), "--kmeans_baseline", "false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def run_seed(work: Path, seed: int, variants: list[str]) -> None:
    if not list(work.glob(f"runs/simclr_fashion_mnist/*-seed{seed}/metrics.json")):
        log = work / f"simclr-{seed}.log"
        if fit("experiments/simclr_fashion_mnist.yaml", seed, work / "runs", 2, [], log).wait():
            raise SystemExit(f"the pretext of seed {seed} failed: {log}")
    pretext = [
        "--model.init_args.pretext_checkpoint",
        f"{work}/runs/simclr_fashion_mnist/*-seed{{seed}}/checkpoints/last.ckpt",
    ]
    runs = []
    first_log = work / f"nnm-{variants[0]}-{seed}.log"
    for name in variants:
        log = work / f"nnm-{name}-{seed}.log"
        runs.append(
            fit("experiments/nnm_fashion_mnist.yaml", seed, work / name, 1, pretext + VARIANTS[name][1], log)
        )
        # The later runs read the neighbours the first mined and cached: one writer of the cache file.
        while runs[0].poll() is None and "label agreement" not in first_log.read_text(errors="replace"):
            time.sleep(5)
    if any(run.wait() for run in runs):
        raise SystemExit(f"an NNM run of seed {seed} failed: see {work}/nnm-*-{seed}.log")


def collect(work: Path, seeds: list[int], variants: list[str]) -> dict:
    def report(pattern: str) -> dict:
        found = sorted(work.glob(pattern))
        return json.loads(found[-1].read_text()) if found else {}

    rows = []
    for seed in seeds:
        pretext = report(f"runs/simclr_fashion_mnist/*-seed{seed}/metrics.json")
        row = {"seed": seed, "pretext_kmeans_acc": pretext.get("acc")}
        for name in variants:
            run = report(f"{name}/nnm_fashion_mnist/*-seed{seed}/metrics.json")
            row[name] = {
                key: run.get(key) for key in ("acc", "nmi", "ari", "selected_head", "epochs", "steps")
            }
            row[name]["heads_acc"] = [head["acc"] for head in run.get("heads", [])]
        rows.append(row)
    return {
        "command": command_line(),
        "machine": machine(gpu(), f"the {len(variants)} NNM runs of a seed side by side, one thread each"),
        "variants": variants,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    variants = result.get("variants", ["random", "kmeans"])
    titles = "".join(f" {VARIANTS[name][0]}: ACC (each head) |" for name in variants)
    lines = [f"| seed | pretext k-means |{titles}", "|---" * (2 + len(variants)) + "|"]
    for row in result["rows"]:
        cells = [str(row["seed"]), f"{row['pretext_kmeans_acc'] or float('nan'):.4f}"]
        for name in variants:
            run = row[name]
            heads = " / ".join(f"{acc:.4f}" for acc in run["heads_acc"])
            cells.append(f"{run['acc']:.4f} ({heads})" if run["acc"] is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["random", "kmeans"])
    parser.add_argument("--collect", action="store_true", help="only tabulate the runs already in --work")
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.collect:
        for seed in args.seeds:
            run_seed(args.work, seed, args.variants)
    result = collect(args.work, args.seeds, args.variants)
    (args.work / "nnm_head_start.json").write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
