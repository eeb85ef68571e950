"""Do two checkouts of clusterlab compute the same numbers? Short fits of every method on digits
(same seed, one thread) in each, then every head's ACC / NMI / ARI compared bit for bit.

    python benchmarks/same_numbers.py OLD_CHECKOUT NEW_CHECKOUT --runs_dir DIR [--epochs 4] [--seed 3]
    python benchmarks/same_numbers.py OLD_CHECKOUT NEW_CHECKOUT --runs_dir DIR --compare_only
    python benchmarks/same_numbers.py OLD_CHECKOUT NEW_CHECKOUT --runs_dir DIR --only new  # old's runs kept
    ... --folder FOLDER   # also `clusterlab cluster FOLDER --epochs 2` in each: K, metrics, every assignment

Used to carry results measured on one commit over to a later one that only refactors: when every
figure matches, a re-run on the older commit stands for the newer one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

STAGES = ("cc", "scl", "dccm", "simclr", "nnm")  # nnm last: it starts from simclr's checkpoint


def fit(checkout: Path, runs: Path, method: str, epochs: int, seed: int) -> None:
    command = [sys.executable, "-m", "clusterlab", "fit", "--config", f"experiments/{method}_digits.yaml"]
    command += ["--seed_everything", str(seed), "--trainer.max_epochs", str(epochs), "--runs_dir", str(runs)]
    if method == "nnm":
        (pretext,) = runs.glob("simclr_digits/*/checkpoints/last.ckpt")
        command += ["--model.init_args.pretext_checkpoint", str(pretext)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(checkout)}
    log = runs / f"{method}.log"
    with open(log, "w") as out:
        subprocess.run(command, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)


def cluster(checkout: Path, runs: Path, folder: Path) -> None:
    command = [sys.executable, "-m", "clusterlab", "cluster", str(folder), "--out", str(runs / "folder")]
    command += ["--epochs", "2", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(checkout)}
    with open(runs / "folder.log", "w") as out:
        subprocess.run(command, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)


def folder_result(runs: Path) -> tuple[dict, str]:
    summary = json.loads((runs / "folder" / "cluster.json").read_text())
    facts = {"K": summary["num_clusters"], **{m: summary["metrics"][m] for m in ("acc", "nmi", "ari")}}
    return facts, (runs / "folder" / "assignments.csv").read_text()


def heads(runs: Path, method: str) -> list[dict]:
    (metrics,) = runs.glob(f"{method}_digits/*/metrics.json")
    return json.loads(metrics.read_text())["heads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--runs_dir", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--compare_only", action="store_true")
    parser.add_argument("--only", choices=("old", "new"), help="fit one side (the other's runs are there)")
    parser.add_argument("--folder", type=Path, help="also the folder command on this folder")
    args = parser.parse_args()
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    if not args.compare_only:
        for side, checkout in sides.items():
            if args.only not in (None, side):
                continue
            for method in STAGES:
                runs = (args.runs_dir / side).resolve()
                runs.mkdir(parents=True, exist_ok=True)
                if not list(runs.glob(f"{method}_digits/*/metrics.json")):  # a run there already stands
                    fit(checkout, runs, method, args.epochs, args.seed)
            if args.folder is not None:
                cluster(checkout, (args.runs_dir / side).resolve(), args.folder.resolve())
    print("| method | head | ACC old / new | NMI old / new | ARI old / new | same |")
    print("|---|---|---|---|---|---|")
    all_same = True
    for method in STAGES:
        old, new = heads(args.runs_dir / "old", method), heads(args.runs_dir / "new", method)
        for h, (a, b) in enumerate(zip(old, new, strict=True)):
            same = all(a[m] == b[m] for m in ("acc", "nmi", "ari"))
            all_same &= same
            cells = " | ".join(f"{a[m]:.6f} / {b[m]:.6f}" for m in ("acc", "nmi", "ari"))
            print(f"| {method} | {h} | {cells} | {'yes' if same else 'NO'} |")
    print(f"\nevery head of every method the same, bit for bit: {all_same}")
    if args.folder is not None:
        (old, old_rows), (new, new_rows) = (folder_result(args.runs_dir / side) for side in ("old", "new"))
        same = old == new and old_rows == new_rows
        all_same &= same
        print(f"\nclusterlab cluster {args.folder.name} --epochs 2: old {old}, new {new}")
        print(f"the same K, metrics and assignments.csv, byte for byte: {same}")
    sys.exit(0 if all_same else 1)


if __name__ == "__main__":
    main()
