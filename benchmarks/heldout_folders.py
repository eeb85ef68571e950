"""`clusterlab cluster` on the held-out folders of benchmarks/make_heldout_folders.py, beside k-means
on the pixels with the true K: the figures of docs/cluster-folder.md, "Folders it was not tuned on".

    python benchmarks/heldout_folders.py --work DIR [--kinds mnist-scans glyphs-colour emoji-colour]
                                         [--routes scratch pretrained] [--seed 0]

For each kind: the folder is made (seed 0) unless DIR/folders/<kind> exists; then
- scratch: `clusterlab cluster FOLDER --out DIR/out/<kind>-scratch --seed S` (the default recipe:
  SimCLR, K chosen, CC; 10 minutes of training);
- pretrained: the same with `--backbone efficientnet_lite0` (the `pretrained` extra);
- k-means on the pixels: every image as the command decodes it (its cache, DIR/out/.../cache,
  `--image_size` px, RGB), flattened, in [0, 1], scikit-learn's k-means with the true number of
  kinds, 10 restarts (`--pixels_only`: recompute this row from the outputs there).
The kinds are read from the top folder of each image's path only to score. Prints one markdown
table and writes DIR/heldout.json (resumable: a route already in it is not run again).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pretrained import folder_labels, kmeans_scores, run_cluster  # noqa: E402 - the script beside this one
from record import command_line, machine  # noqa: E402

KINDS = ("mnist-scans", "glyphs-colour", "emoji-colour")
ROUTES = {"scratch": [], "pretrained": ["--backbone", "efficientnet_lite0"]}


def run_command(folder: Path, out: Path, route: str, seed: int) -> dict:
    args = ["--seed", str(seed), *ROUTES[route]]
    summary, seconds = run_cluster(folder, out, args)
    _, kinds, _ = folder_labels(out)
    return {
        "command": f"clusterlab cluster {folder} --out {out} " + " ".join(args),
        "k": summary["num_clusters"],
        "classes": len(kinds),
        **{m: summary["metrics"][m] for m in ("acc", "nmi", "ari")},
        "seconds": seconds,
        "method": summary["method"],
    }


def pixel_kmeans(out: Path, seed: int) -> dict:
    """k-means with the true K on the pixels of the images as the command decoded them."""
    index = json.loads((out / "cache" / "index.json").read_text())
    pixels = np.fromfile(out / "cache" / "images.u8", np.uint8).reshape(len(index["paths"]), -1)
    rows, kinds, labels = folder_labels(out)
    by_path = {p: i for i, p in enumerate(index["paths"])}
    x = pixels[[by_path[r["path"]] for r in rows]].astype(np.float32) / 255.0  # the raw pixels
    scores = kmeans_scores(x, labels, len(kinds), seed)
    return {"k": len(kinds), **{m: scores[m] for m in ("acc", "nmi", "ari")}, "side": index["size"]}


def table(results: dict) -> str:
    lines = [
        "| folder | what | K (truth) | ACC | NMI | ARI | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, part in results["kinds"].items():
        for route, r in part.get("routes", {}).items():
            what = "clusterlab cluster" + (" --backbone efficientnet_lite0" if route == "pretrained" else "")
            lines.append(
                f"| {kind} | {what} ({r['method']}) | {r['k']} ({r['classes']}) | {r['acc']:.4f} | "
                f"{r['nmi']:.4f} | {r['ari']:.4f} | {r['seconds']:.0f} s |"
            )
        if "pixels" in part:
            p = part["pixels"]
            lines.append(
                f"| {kind} | k-means on the pixels ({p['side']} px) | {p['k']} | {p['acc']:.4f} | "
                f"{p['nmi']:.4f} | {p['ari']:.4f} | |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), choices=list(ROUTES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pixels_only", action="store_true", help="recompute the k-means rows only")
    args = parser.parse_args()
    record = args.work / "heldout.json"
    results = json.loads(record.read_text()) if record.exists() else {"kinds": {}}
    results["machine"] = machine(f"{torch.get_num_threads()} threads", "no GPU")
    results["command"] = command_line()
    for kind in args.kinds:
        folder = args.work / "folders" / kind
        if not folder.exists():
            subprocess.run(
                [sys.executable, str(REPO / "benchmarks" / "make_heldout_folders.py"), kind, str(folder)],
                check=True,
            )
        part = results["kinds"].setdefault(kind, {"routes": {}})
        if args.pixels_only:
            if (args.work / "out" / f"{kind}-scratch").exists():
                part["pixels"] = pixel_kmeans(args.work / "out" / f"{kind}-scratch", args.seed)
                record.write_text(json.dumps(results, indent=2) + "\n")
            continue
        for route in args.routes:
            if route in part["routes"]:
                continue
            out = args.work / "out" / f"{kind}-{route}"
            part["routes"][route] = run_command(folder, out, route, args.seed)
            if route == "scratch" and "pixels" not in part:  # the command's 32 px decode
                part["pixels"] = pixel_kmeans(out, args.seed)
            record.write_text(json.dumps(results, indent=2) + "\n")
            print(table(results), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
