"""Clustering on pretrained features, side by side: k-means on EfficientNet-Lite0's ImageNet features
and TEMI's heads on them, on digits, Fashion-MNIST (its 10,000 test images) and the folders of
benchmarks/make_folders.py, over 3 seeds, with the wall time of each step on this machine.

    python benchmarks/pretrained.py --work DIR [--seeds 0 1 2] [--parts digits fashion folders]
                                    [--cold_folder]

- digits / fashion: the images are embedded once (clusterlab.features, timed here), k-means
  (scikit-learn, 10 restarts, K = the classes) on the L2-normalised features per seed, then
  `clusterlab fit --config experiments/temi_<data>_lite0.yaml --seed_everything S` per seed (its
  metrics.json: ACC / NMI / ARI of the head with the lowest loss, and its wall time; the features
  are read back from the cache, so the fit's time is the heads' training).
- folders: `clusterlab cluster FOLDER --backbone efficientnet_lite0 --seed S` (K chosen), and
  k-means with the true K on the features the command chose K on (cache/features.npy).
- --cold_folder: one folder run end to end with an empty features cache (HOME in DIR), the
  "2,000 images embedded, clustered and reported" time.

Prints one markdown table per part and writes DIR/pretrained.json. One thread per process
(OMP_NUM_THREADS=1) except the folder command, which uses the machine's threads as a user's would.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from record import command_line, machine  # noqa: E402 - the module beside this one

FOLDERS = ("digits-colour", "digits-grey", "fashion-grey")


def kmeans_scores(features: np.ndarray, labels: np.ndarray, k: int, seed: int) -> dict:
    from sklearn.cluster import KMeans

    from clusterlab.metrics import evaluate

    started = time.time()
    clusters = KMeans(k, n_init=10, random_state=seed).fit_predict(features)
    scores = evaluate(torch.as_tensor(clusters), torch.as_tensor(labels))
    return {**{m: float(scores[m]) for m in ("acc", "nmi", "ari")}, "seconds": time.time() - started}


def embed_dataset(config: str) -> tuple[np.ndarray, np.ndarray, float]:
    """The training images of `config` through its backbone, into the features cache (as TEMI's
    setup would), and their labels; the seconds it took (0 when read back)."""
    from clusterlab.cli import ClusterLabCLI
    from clusterlab.features import digest, embed_once

    cli = ClusterLabCLI(args=["--config", config], run=False)
    model, data = cli.model, cli.datamodule
    data.setup("fit")
    images = data.train_set.images
    key = digest(model.backbone, model.views, images)

    def step(batch):
        return {"features": model.backbone(model.plain(batch["image"]))}

    started = time.time()
    features, _ = embed_once(
        model, data.train_eval_dataloader(), step, key, len(images), model.hparams.feature_cache
    )
    seconds = time.time() - started
    normalised = torch.nn.functional.normalize(features, dim=1).numpy()
    return normalised, data.train_set.labels.numpy(), seconds


def fit(config: str, seed: int, work: Path) -> dict:
    command = [sys.executable, "-m", "clusterlab", "fit", "--config", str(REPO / config)]
    command += [
        "--seed_everything",
        str(seed),
        "--runs_dir",
        str(work / "runs"),
        "--figures.enabled",
        "false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.time()
    log = work / f"{Path(config).stem}-seed{seed}.log"
    with open(log, "w") as out:
        subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    (metrics,) = sorted((work / "runs" / Path(config).stem).glob(f"*-seed{seed}/metrics.json"))[-1:]
    report = json.loads(metrics.read_text())
    return {
        **{m: report[m] for m in ("acc", "nmi", "ari")},
        "seconds": report["wall_time_s"],
        "process_seconds": time.time() - started,
        "run": str(metrics.parent),
    }


def dataset_part(config: str, seeds: list[int], work: Path) -> dict:
    torch.set_num_threads(1)
    features, labels, embed_seconds = embed_dataset(config)
    k = int(labels.max()) + 1
    return {
        "images": len(labels),
        "embed_seconds": embed_seconds,
        "kmeans": {s: kmeans_scores(features, labels, k, s) for s in seeds},
        "temi": {s: fit(config, s, work) for s in seeds},
    }


def run_cluster(folder: Path, out: Path, args: list[str], env: dict | None = None) -> tuple[dict, float]:
    """`clusterlab cluster FOLDER --out OUT ARGS`, its output in OUT.log; its cluster.json and the
    seconds it took."""
    command = [sys.executable, "-m", "clusterlab", "cluster", str(folder), "--out", str(out), *args]
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(f"{out}.log", "w") as log:
        subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.time() - started
    return json.loads((out / "cluster.json").read_text()), seconds


def folder_labels(out: Path) -> tuple[list[dict], list[str], np.ndarray]:
    """The rows of OUT/assignments.csv, the kinds (each path's top folder, sorted) and every row's
    kind as an index: the labels the scores are computed against, read only to score."""
    rows = list(csv.DictReader(open(out / "assignments.csv", newline="")))
    kinds = sorted({r["path"].split("/")[0] for r in rows})
    return rows, kinds, np.array([kinds.index(r["path"].split("/")[0]) for r in rows])


def cluster_folder(folder: Path, out: Path, seed: int, env: dict | None = None) -> dict:
    summary, seconds = run_cluster(
        folder, out, ["--backbone", "efficientnet_lite0", "--seed", str(seed)], env
    )
    _, kinds, labels = folder_labels(out)
    features = np.load(out / "cache" / "features.npy")
    return {
        "k": summary["num_clusters"],
        "classes": len(kinds),
        **{m: summary["metrics"][m] for m in ("acc", "nmi", "ari")},
        "seconds": seconds,
        "minutes_reported": summary["total_minutes"],
        "kmeans": kmeans_scores(features, labels, len(kinds), seed),
    }


def make_folder(kind: str, folder: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "make_folders.py"), kind, str(folder)], check=True
    )


def folders_part(seeds: list[int], work: Path) -> dict:
    results = {}
    for kind in FOLDERS:
        folder = work / "folders" / kind
        if not folder.exists():
            make_folder(kind, folder)
        results[kind] = {s: cluster_folder(folder, work / "out" / f"{kind}-seed{s}", s) for s in seeds}
    return results


def cold_folder(work: Path) -> dict:
    """digits-colour end to end with nothing cached: HOME (and with it ~/.cache) in the work folder."""
    folder = work / "folders" / FOLDERS[0]
    if not folder.exists():
        subprocess.run(
            [sys.executable, str(REPO / "benchmarks" / "make_folders.py"), FOLDERS[0], str(folder)],
            check=True,
        )
    home = work / "cold-home"
    home.mkdir(parents=True, exist_ok=True)
    out = work / "out" / "cold"
    return cluster_folder(folder, out, 0, env={**os.environ, "HOME": str(home)})


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def table(results: dict) -> str:
    lines = ["| data | method | K | ACC | NMI | ARI | time per run |", "|---|---|---|---|---|---|---|"]
    for name, part in results.get("datasets", {}).items():
        for method, runs in (("k-means on the features", part["kmeans"]), ("TEMI heads", part["temi"])):
            cells = " | ".join(mean_std([r[m] for r in runs.values()]) for m in ("acc", "nmi", "ari"))
            seconds = statistics.mean(r["seconds"] for r in runs.values())
            lines.append(f"| {name} ({part['images']:,}) | {method} | classes | {cells} | {seconds:.0f} s |")
        lines.append(f"| {name} | embedding, once | | | | | {part['embed_seconds']:.0f} s |")
    for kind, runs in results.get("folders", {}).items():
        ks = ", ".join(str(r["k"]) for r in runs.values())
        cells = " | ".join(mean_std([r[m] for r in runs.values()]) for m in ("acc", "nmi", "ari"))
        seconds = ", ".join(f"{r['seconds']:.0f}" for r in runs.values())
        lines.append(f"| {kind} (2,000) | clusterlab cluster --backbone | {ks} | {cells} | {seconds} s |")
        km = " | ".join(mean_std([r["kmeans"][m] for r in runs.values()]) for m in ("acc", "nmi", "ari"))
        lines.append(
            f"| {kind} | k-means on the same features | {runs[next(iter(runs))]['classes']} | {km} | |"
        )
    if "cold" in results:
        c = results["cold"]
        lines.append(
            f"| {FOLDERS[0]}, nothing cached | clusterlab cluster --backbone | {c['k']} | {c['acc']:.4f} | "
            f"{c['nmi']:.4f} | {c['ari']:.4f} | {c['seconds']:.0f} s end to end |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", default=["digits", "fashion", "folders"])
    parser.add_argument("--cold_folder", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    saved = args.work / "pretrained.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    results["machine"] = machine()
    results["command"] = command_line()
    configs = {
        "digits": "experiments/temi_digits_lite0.yaml",
        "fashion": "experiments/temi_fashion_mnist_lite0.yaml",
    }
    for part in args.parts:
        if part in configs:
            results.setdefault("datasets", {})[part] = dataset_part(configs[part], args.seeds, args.work)
        elif part == "folders":
            results["folders"] = folders_part(args.seeds, args.work)
        saved.write_text(json.dumps(results, indent=2) + "\n")
    if args.cold_folder:
        results["cold"] = cold_folder(args.work)
        saved.write_text(json.dumps(results, indent=2) + "\n")
    print(f"Machine: {results['machine']}. Command: {results['command']}\n")
    print(table(results))


if __name__ == "__main__":
    main()
