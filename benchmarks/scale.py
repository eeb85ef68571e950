"""Time and peak memory of clusterlab's kNN and k-means (clusterlab.neighbors) at 1M vectors.

    OMP_NUM_THREADS=2 python benchmarks/scale.py [--n 1000000] [--dim 512] [--queries 10000] \
        [--kmeans 100:10 1000:1] [--out benchmarks/results/scale-cpu.md]

Features: seeded random Gaussian rows (torch.randn), float32, n x dim (2 GiB at 1M x 512).
a) kNN, k = 10, cosine: `queries` rows searched against all n rows, by the torch backend (blocks
   sized by knn's default rule from the free memory) and by the faiss backend. A search of all n
   rows is n / queries times the work of this one (every query scans every row): the table gives
   that linear extrapolation, labelled as one, not a measurement.
b) k-means as a KMeansHead fits it (100 iterations), for each k:n_init given: trained on the
   100,000-row subsample (kmeans' max_points), then every row assigned to its nearest centre.

Each measurement runs in a fresh process, so that its peak memory (ru_maxrss, a high-water mark)
is its own: the growth over the peak right after the features were made.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import command_line, machine_line, write_report  # noqa: E402

from clusterlab.neighbors import MEMORY_FRACTION, free_memory, kmeans, knn, search_block  # noqa: E402

K = 10  # neighbours per query


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure(what: str, n: int, dim: int, queries: int, clusters: int, n_init: int) -> dict:
    """One measurement, in this process: seconds and peak memory growth."""
    features = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    knn(features[:2_000], K, queries=features[:10], backend="torch")  # lazy set-up, small
    before, free = _peak(), free_memory(torch.device("cpu"))
    extra = {}
    start = time.perf_counter()
    if what in ("torch", "faiss"):
        if what == "torch":  # the block this search gets: knn's rule, from the same free memory
            extra["block"] = search_block(n, queries, dim, K, torch.device("cpu"))
        knn(features, K, queries=features[:queries], backend=what)
    else:
        assignments, _ = kmeans(features, clusters, seed=0, n_init=n_init)
        extra["clusters_used"] = int(assignments.unique().numel())
    return {
        "seconds": time.perf_counter() - start,
        "growth": _peak() - before,
        "free": free,
        **extra,
    }


def run(what: str, args, clusters: int = 0, n_init: int = 0) -> dict:
    command = [sys.executable, __file__, "--measure", what, "--n", str(args.n), "--dim", str(args.dim)]
    command += ["--queries", str(args.queries), "--clusters", str(clusters), "--n_init", str(n_init)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(what, clusters or "", result, flush=True)
    return result


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--kmeans", nargs="*", default=["100:10", "1000:1"], help="k:n_init pairs")
    parser.add_argument("--out", default="benchmarks/results/scale-cpu.md")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # a child process's one job
    parser.add_argument("--clusters", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--n_init", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.n, args.dim, args.queries, args.clusters, args.n_init)))
        return

    n, dim, q = args.n, args.dim, args.queries
    lines = [
        f"# Scale: kNN and k-means at {n:,} vectors (cpu)",
        "",
        "```",
        command_line(),
        "```",
        "",
        machine_line(
            platform.platform(),
            "no GPU",
            f"torch {torch.__version__}",
            f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})",
        )
        + f"; {gib(free_memory(torch.device('cpu')))} MemAvailable at the start. The machine is shared with "
        "other work: the times are upper bounds. Features: seeded random Gaussian, float32, "
        f"{n:,} x {dim} ({gib(4 * n * dim)}). Peak memory: ru_maxrss growth of a fresh process over "
        "its peak right after making the features (so the features themselves are not counted).",
        "",
        f"## a) kNN, k = {K}, cosine: {q:,} queries against all {n:,} rows",
        "",
        "| backend | seconds | peak memory growth | query block | all "
        f"{n:,} rows' neighbours, extrapolated (x {n / q:,.0f}) |",
        "|---|---|---|---|---|",
    ]
    for backend in ("torch", "faiss"):
        r = run(backend, args)
        block = (
            f"{r['block']} rows ({MEMORY_FRACTION:g} x {gib(r['free'])} free)"
            if backend == "torch"
            else "faiss's"
        )
        whole = r["seconds"] * n / q
        lines.append(
            f'| knn(backend="{backend}") | {r["seconds"]:.1f} | {gib(r["growth"])} | {block} | '
            f"{whole:,.0f} s = {whole / 3600:.1f} h (extrapolation) |"
        )
    lines += [
        "",
        f"The torch search's former fixed blocks of 4,096 queries would hold {gib(4_096 * n * 4)} of "
        "scores each at this n.",
        "",
        f"## b) k-means of all {n:,} rows, 100 iterations, trained on the 100,000-row subsample",
        "",
        "| k | n_init | seconds (train + assign every row) | peak memory growth | clusters used |",
        "|---|---|---|---|---|",
    ]
    for pair in args.kmeans:
        clusters, n_init = (int(x) for x in pair.split(":"))
        r = run("kmeans", args, clusters, n_init)
        lines.append(
            f"| {clusters} | {n_init} | {r['seconds']:.1f} | {gib(r['growth'])} | {r['clusters_used']} |"
        )
    write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
