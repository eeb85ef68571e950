"""DCCM's restarts: the selected one (lowest loss) against their vote, from recorded runs.

    python benchmarks/dccm_vote.py RUN_DIR [RUN_DIR ...] [--out benchmarks/results/dccm-vote-digits.md]

Each RUN_DIR is a finished `clusterlab fit` of a DCCM config with several heads (restarts on
separate backbones), trained with `combine_heads` "select" or "vote": training does not depend on
it. The script loads the run's checkpoint with `combine_heads="vote"` and, where the checkpoint has
no alignment (a run trained with "select"), counts the restarts' co-assignments over one pass of
the run's training images at the final weights, where a voting run counts them over its last
epoch's targets; the rest is the library's own code (`record_head_assignments`, `match_clusters`,
`combined_proba`). Labels only score the partitions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import command_line, machine_line, write_report  # noqa: E402

from clusterlab.data.datamodule import ClusterDataModule  # noqa: E402
from clusterlab.methods import DCCM  # noqa: E402
from clusterlab.methods.base import match_clusters  # noqa: E402
from clusterlab.metrics import evaluate  # noqa: E402


@torch.no_grad()
def compare(run: Path, batch_size: int = 512) -> dict:
    """Every restart's ACC, the selected one's, and the vote's, of one run folder."""
    checkpoint = run / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = DCCM.load_from_checkpoint(checkpoint, map_location="cpu", combine_heads="vote", strict=False)
    model.eval()
    data_args = state["datamodule_hyper_parameters"]
    data_args.pop("_instantiator", None)  # LightningCLI's note of how it built the module
    data = ClusterDataModule(**data_args)
    data.setup("fit")
    images, labels = data.train_set.images, data.train_set.labels
    probabilities = torch.cat(
        [model.predict_proba(images[i : i + batch_size]) for i in range(0, len(images), batch_size)], 1
    )
    counted = "head_alignment" in state["state_dict"]
    if not counted:  # trained with "select": the co-assignments of one pass at the final weights
        model.head_agreement.zero_()
        model.record_head_assignments(probabilities)
        model.head_alignment.copy_(match_clusters(model.head_agreement[:, model.selected_head]))
    heads = [evaluate(p.argmax(-1), labels)["acc"] for p in probabilities]
    vote = evaluate(model.combined_proba(probabilities).argmax(-1), labels)["acc"]
    seed = json.loads((run / "metrics.json").read_text())["seed"]
    return {
        "run": str(run),
        "seed": seed,
        "restarts": heads,
        "selected": model.selected_head,
        "head_losses": model.head_loss.tolist(),
        "select": heads[model.selected_head],
        "vote": vote,
        "alignment": "the last epoch's targets" if counted else "one pass at the final weights",
    }


def summary(values: list[float], target: float = 0.95) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    worst = min(values)
    under = sum(v < target for v in values)
    return f"{statistics.mean(values):.4f} +- {spread:.4f} | {worst:.4f} | {under} of {len(values)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = sorted((compare(run) for run in args.runs), key=lambda row: row["seed"])
    lines = [
        "# DCCM's restarts: the lowest loss against their vote",
        "",
        "```",
        command_line(),
        "```",
        "",
        machine_line(),
        "",
        "| seed | each restart: ACC | selected (lowest loss) | vote | alignment from |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        restarts = " / ".join(f"{acc:.4f}" for acc in row["restarts"])
        lines.append(
            f"| {row['seed']} | {restarts} | {row['select']:.4f} (restart {row['selected']}) "
            f"| {row['vote']:.4f} | {row['alignment']} |"
        )
    lines += [
        "",
        "| combination | mean +- std | worst | under 0.95 |",
        "|---|---|---|---|",
        f"| selected (lowest loss) | {summary([row['select'] for row in rows])} |",
        f"| vote | {summary([row['vote'] for row in rows])} |",
        "",
    ]
    write_report("\n".join(lines), args.out)
    if args.out:
        record = {"command": command_line(), "machine": machine_line()[len("Machine: ") :], "runs": rows}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
