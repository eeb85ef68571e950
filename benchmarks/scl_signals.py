"""What an SCL run knows about itself at its end, beside its ACC, from recorded runs.

    python benchmarks/scl_signals.py RUN_DIR [RUN_DIR ...] [--out benchmarks/results/scl-signals-digits.md]

Each RUN_DIR is a finished `clusterlab fit` of an SCL config. Read from the run folder, without
labels: the sizes of the target ("clustering") task's pseudo labels after the last refresh
(`sample_table.labels` in `checkpoints/last.ckpt`), as fractions of the mean size N / C, and that
task's concept loss (Eq. 4), the mean of the last `--last` epochs in metrics.csv (a run with
restarts: the kept restart's score, the same mean over its own last 10 epochs). The run's ACC
(metrics.json) only names which runs ended in a trap.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from clusterlab.methods.base import ClusteringMethod

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import command_line, cpu, machine_line, write_report  # noqa: E402

CONCEPT = "train/clustering/concept"
WINDOW = ClusteringMethod.RESTART_WINDOW  # the epochs a restart's score is the mean of


def signals(run: Path, last: int = WINDOW) -> dict:
    """The target task's cluster sizes and concept loss at the end of one SCL run, and its ACC."""
    checkpoint = run / "checkpoints" / "last.ckpt"
    if not all(path.is_file() for path in (checkpoint, run / "metrics.csv", run / "metrics.json")):
        raise SystemExit(
            f"{run}: not a finished run folder (needs checkpoints/last.ckpt, metrics.csv and metrics.json)"
        )
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    labels = state["state_dict"]["sample_table.labels"][0]  # row 0: the target task (scl_tasks' order)
    clusters = state["hyper_parameters"]["num_clusters"]
    sizes = torch.bincount(labels, minlength=clusters).sort().values.tolist()
    mean_size = len(labels) / clusters
    with open(run / "metrics.csv", newline="") as f:
        concept = [float(row[CONCEPT]) for row in csv.DictReader(f) if row.get(CONCEPT)]
    if not concept:
        raise SystemExit(f"{run}/metrics.csv has no {CONCEPT} column: not an SCL run with its target task")
    metrics = json.loads((run / "metrics.json").read_text())
    restarts = metrics.get("restarts")
    if restarts and last == WINDOW:  # the kept restart's own score (its last epochs), not the last restart's
        concept = [restarts["scores"][restarts["selected"]]]
    return {
        "run": str(run),
        "seed": metrics["seed"],
        "acc": metrics["acc"],
        "sizes": sizes,
        "smallest": sizes[0] / mean_size,
        "largest": sizes[-1] / mean_size,
        "concept_loss": sum(concept[-last:]) / len(concept[-last:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--last", type=int, default=WINDOW, help="epochs of the concept loss's mean")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = sorted((signals(run, args.last) for run in args.runs), key=lambda row: row["seed"])
    command, machine = command_line(), machine_line(cpu())
    lines = [
        "# SCL at the end of a run: cluster sizes and concept loss beside ACC",
        "",
        "```",
        command,
        "```",
        "",
        machine,
        "",
        f"| seed | ACC | smallest / largest cluster (x N / C) | sizes | concept loss, last {args.last} epochs"
        " |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        sizes = " ".join(map(str, row["sizes"]))
        lines.append(
            f"| {row['seed']} | {row['acc']:.4f} | {row['smallest']:.2f} / {row['largest']:.2f} | {sizes} "
            f"| {row['concept_loss']:.3f} |"
        )
    write_report("\n".join(lines) + "\n", args.out)
    if args.out:
        record = {"command": command, "machine": machine[len("Machine: ") :], "runs": rows}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
