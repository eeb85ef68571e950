"""The prepared device script: what one GPU shows about clusterlab, in one call of at most 8 minutes.

    bash benchmarks/device/run.sh            # on the GPU machine (installs the carried wheels first)
    python benchmarks/device/measure.py --out OUT [--data_root DIR] [--parts a b c d e]
    python benchmarks/device/measure.py --quick --out OUT --data_root TINY   # CPU, seconds (make test)

a) CC and SimCLR training images/s at 32 px (ResNet-18, CIFAR stem, Fashion-MNIST, batch 256):
   float32 against bf16-mixed, channels_last off / on, torch.compile off / on (compile with bf16 and
   channels_last only: each compile costs about a minute).
b) Views made on the GPU (clusterlab) against PIL views in DataLoader workers (the CC authors'
   pipeline, benchmarks/cc_authors.py), same network, both float32 NCHW: a ratio.
c) kNN, k = 20, at 70,000 and 1,000,000 x 512 vectors: the torch backend (blocked matrix products on
   the GPU) against faiss (the carried CPU wheel, all cores); at 1M, faiss on 10,000 queries and
   extrapolated.
d) CC on Fashion-MNIST (experiments/cc_fashion_mnist.yaml) for 3 minutes of training in bf16-mixed,
   then its evaluation on all 70,000 images: ACC / NMI / ARI.
e) Host syncs per steady training step of each method's digits config, two ways:
   clusterlab.syncs.HostSyncCounter (ops that wait) and torch.cuda.set_sync_debug_mode("warn")
   (the warnings CUDA's allocator and kernels raise when they wait).

Runs the parts cheapest first (e, c, b, d, a: the compiled rows of a last) and writes OUT/device.json
(every figure) and OUT/device.md (the tables, in the order a-e) part by part as each ends, so
that a part that fails or a run stopped at its time limit keeps what was measured; a failed part
records its error and the next one runs. `--quick` runs every part at toy sizes on the CPU (tiny
data, one step, no compile, 3 seconds in d)) so that the script cannot rot; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import cc_authors  # noqa: E402
from record import command_line  # noqa: E402
from throughput import timed_fit  # noqa: E402

from clusterlab.syncs import HostSyncCounter  # noqa: E402


class Sizes:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.batch = 8 if quick else 256
        self.steps, self.warmup = (1, 1) if quick else (30, 10)
        self.compile_warmup = 1 if quick else 15
        self.knn = [2_000] if quick else [70_000, 1_000_000]
        self.knn_dim = 16 if quick else 512
        self.faiss_queries = 500 if quick else 10_000
        self.minutes = 0.05 if quick else 3.0
        self.workers = 2 if quick else min(8, os.cpu_count() or 1)


def overrides(config: str, root: str, batch: int, precision: str, channels_last: bool, compile: bool):
    args = cc_authors.clusterlab_overrides(root, batch, precision)
    if config.startswith("experiments/simclr"):  # SimCLR's config has no sync_batchnorm key of its own
        args = [a for a in args if not a.startswith("--trainer.sync_batchnorm")]
    return [
        *args,
        f"--speed.channels_last={str(channels_last).lower()}",
        f"--speed.compile={str(compile).lower()}",
    ]


# -- a) --------------------------------------------------------------------------------------------


def part_a(sizes: Sizes, root: str, device: str) -> dict:
    rows = []
    methods = (("CC", "experiments/cc_cifar10.yaml"), ("SimCLR", "experiments/simclr_cifar10.yaml"))
    grid = [(p, cl, False) for p in ("32-true", "bf16-mixed") for cl in (False, True)]
    runs = [(name, config, *row) for name, config in methods for row in grid]
    if not sizes.quick:  # the compiled rows last: each compiles for about a minute
        runs += [(name, config, "bf16-mixed", True, True) for name, config in methods]
    for name, config, precision, channels_last, compiled in runs:
        warmup = sizes.compile_warmup if compiled else sizes.warmup
        timer, _ = timed_fit(
            config,
            overrides(config, root, sizes.batch, precision, channels_last, compiled),
            device,
            sizes.steps,
            warmup,
        )
        rows.append(
            {
                "method": name,
                "precision": precision,
                "channels_last": channels_last,
                "compile": compiled,
                "images_per_s": timer.images / timer.seconds,
                "dtypes": sorted(str(d) for d in timer.dtypes),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            }
        )
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
    for row in rows:  # each against its method's float32 NCHW row
        base = next(r for r in rows if r["method"] == row["method"] and r["precision"] == "32-true")
        row["vs_fp32"] = row["images_per_s"] / base["images_per_s"]
    return {"batch": sizes.batch, "steps": sizes.steps, "rows": rows}


# -- b) --------------------------------------------------------------------------------------------


def part_b(sizes: Sizes, root: str, device: str) -> dict:
    images = cc_authors.load_images(root)
    authors = cc_authors.authors_images_per_s(
        images, sizes.batch, sizes.workers, sizes.steps, sizes.warmup, device=device
    )
    config = "experiments/cc_cifar10.yaml"
    timer, _ = timed_fit(
        config,
        overrides(config, root, sizes.batch, "32-true", False, False),
        device,
        sizes.steps,
        sizes.warmup,
    )
    ours = timer.images / timer.seconds
    return {"workers": sizes.workers, "authors": authors, "clusterlab": ours, "ratio": ours / authors}


# -- c) --------------------------------------------------------------------------------------------


def part_c(sizes: Sizes, device: str) -> dict:
    from clusterlab.neighbors import knn

    rows = []
    generator = torch.Generator().manual_seed(0)
    for n in sizes.knn:
        features = torch.randn(n, sizes.knn_dim, generator=generator)
        on_device = features.to(device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        knn(on_device, 20, backend="torch")
        if device == "cuda":
            torch.cuda.synchronize()
        torch_s = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        queries = features[: min(n, sizes.faiss_queries)] if n > 100_000 or sizes.quick else None
        start = time.perf_counter()
        knn(features, 20, queries=queries, backend="faiss")
        faiss_s = time.perf_counter() - start
        measured = n if queries is None else len(queries)
        rows.append(
            {
                "n": n,
                "dim": sizes.knn_dim,
                "torch_s": torch_s,
                "torch_peak_gib": peak,
                "faiss_queries": measured,
                "faiss_s": faiss_s,
                "faiss_s_all": faiss_s * n / measured,  # extrapolated when measured < n
                "faiss_over_torch": faiss_s * n / measured / torch_s,
            }
        )
        del features, on_device
    return {"k": 20, "faiss_gpus": _faiss_gpus(), "rows": rows}


def _faiss_gpus() -> int:
    from clusterlab.neighbors import faiss_gpus

    return faiss_gpus()


# -- d) --------------------------------------------------------------------------------------------


def part_d(sizes: Sizes, root: str, device: str, scratch: Path) -> dict:
    from clusterlab.benchmark import run_stage  # the runner's launch: run folder from the file the run writes

    seconds = max(1, round(sizes.minutes * 60))
    config, runs_dir = "experiments/cc_fashion_mnist.yaml", str(scratch / "runs")
    extra = [
        f"--data.root={root}",
        "--trainer.precision=bf16-mixed",
        f"--trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}",
        "--trainer.max_epochs=1000",
        "--kmeans_baseline=false",
        "--figures.enabled=false" if sizes.quick else "--figures.enabled=true",
        *(["--data.batch_size=8", "--trainer.check_val_every_n_epoch=1000"] if sizes.quick else []),
    ]
    start = time.perf_counter()
    run_dir = run_stage(config, 0, extra, runs_dir, timeout=seconds + 300)
    wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    command = [
        "clusterlab",
        "fit",
        "--config",
        config,
        "--seed_everything",
        "0",
        "--runs_dir",
        runs_dir,
        *extra,
    ]
    return {
        "command": shlex.join(command),
        "train_seconds": seconds,
        "wall_seconds": wall,
        **{key: metrics.get(key) for key in ("epochs", "steps", "acc", "nmi", "ari", "wall_time_s")},
    }


# -- e) --------------------------------------------------------------------------------------------


def part_e(sizes: Sizes, device: str, scratch: Path) -> dict:
    import pytorch_lightning as pl

    from clusterlab.cli import ClusterLabCLI
    from clusterlab.syncs import CountTrainingSyncs

    rows = []
    pretext = None
    for method in ("cc", "simclr", "nnm", "scl", "dccm"):
        extra = []
        if method == "nnm":
            if pretext is None:
                simclr = ClusterLabCLI(
                    args=["--config", "experiments/simclr_digits.yaml", "--runs_dir", str(scratch / "e")],
                    run=False,
                )
                checkpoint = {"state_dict": simclr.model.state_dict()}
                simclr.model.on_save_checkpoint(checkpoint)
                pretext = str(scratch / "pretext.ckpt")
                torch.save(checkpoint, pretext)
            extra = ["--model.init_args.pretext_checkpoint", pretext]
        cli = ClusterLabCLI(
            args=[
                "--config",
                f"experiments/{method}_digits.yaml",
                "--data.batch_size=32",
                "--runs_dir",
                str(scratch / "e"),
                *extra,
                *(["--model.init_args.restarts=1"] if method == "scl" else []),  # a 2-epoch count
            ],
            run=False,
        )
        counter = CountTrainingSyncs(warmup=5)
        counter.counter = CudaWarningCounter(cpu_run=device == "cpu")
        trainer = pl.Trainer(
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            max_epochs=2,
            limit_train_batches=8 if not sizes.quick else 4,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=8 if not sizes.quick else 4,
            callbacks=[counter],
        )
        trainer.fit(cli.model, cli.datamodule)
        steps = max(counter.steps, 1)
        rows.append(
            {
                "method": method,
                "steps": counter.steps,
                "host_syncs_per_step": counter.counter.total / steps,
                "cuda_sync_warnings_per_step": counter.counter.cuda_warnings / steps,
                "where": counter.summary(),
            }
        )
    return {"rows": rows}


class CudaWarningCounter(HostSyncCounter):
    """HostSyncCounter, plus torch.cuda.set_sync_debug_mode("warn") over the same span on a GPU:
    `cuda_warnings` counts what CUDA itself reports as waiting."""

    cuda_warnings = 0
    _catch = None

    def __enter__(self):
        if torch.cuda.is_available() and not self.cpu_run:
            torch.cuda.set_sync_debug_mode("warn")
            self._catch = warnings.catch_warnings(record=True)
            self._caught = self._catch.__enter__()
            warnings.simplefilter("always")
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        if self._catch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.cuda_warnings += sum("synchroniz" in str(w.message) for w in self._caught)
            self._catch.__exit__(None, None, None)
            self._catch = None
        return result


# -- the report --------------------------------------------------------------------------------------


def machine(device: str) -> dict:
    from clusterlab.env import collect  # what `clusterlab env` prints

    return {"device": device, **{k: v for k, v in collect().items()}}


def markdown(result: dict) -> str:
    m = result["machine"]
    gpu = next((v for k, v in m.items() if k.startswith("GPU")), None) or result["device"]
    lines = [
        f"# Device benchmark ({gpu})",
        "",
        "```",
        result["command"],
        "```",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in m.items() if k not in ("executable", "platform")),
        "",
    ]
    if result.get("quick"):
        lines += ["**--quick: toy sizes on the CPU; these figures mean nothing.**", ""]
    a = result["parts"].get("a")
    if a and "rows" in a:
        lines += [
            f"## a) Training images/s, ResNet-18 at 32 px, batch {a['batch']}, {a['steps']} timed steps",
            "",
            "| method | precision | channels_last | compile | images/s | vs float32 NCHW | peak GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in a["rows"]:
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else ""
            lines.append(
                f"| {r['method']} | {r['precision']} | {r['channels_last']} | {r['compile']} | "
                f"{r['images_per_s']:,.0f} | {r['vs_fp32']:.2f}x | {peak} |"
            )
        lines.append("")
    b = result["parts"].get("b")
    if b and "ratio" in b:
        lines += [
            "## b) Views on the device vs PIL views in DataLoader workers (same network, float32 NCHW)",
            "",
            "| pipeline | images/s |",
            "|---|---|",
            f"| the CC authors' (PIL views in {b['workers']} workers) | {b['authors']:,.0f} |",
            f"| clusterlab (views on the device) | {b['clusterlab']:,.0f} |",
            f"| **ratio** | **{b['ratio']:.2f}x** |",
            "",
        ]
    c = result["parts"].get("c")
    if c and "rows" in c:
        lines += [
            f"## c) kNN, k = {c['k']} (faiss GPUs: {c['faiss_gpus']})",
            "",
            "| vectors | torch blocks s | torch peak GiB | faiss queries timed | faiss s (all queries) "
            "| faiss / torch |",
            "|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            peak = f"{r['torch_peak_gib']:.1f}" if r["torch_peak_gib"] is not None else ""
            extrapolated = " (extrapolated)" if r["faiss_queries"] < r["n"] else ""
            lines.append(
                f"| {r['n']:,} x {r['dim']} | {r['torch_s']:.2f} | {peak} | {r['faiss_queries']:,} | "
                f"{r['faiss_s_all']:.1f}{extrapolated} | {r['faiss_over_torch']:.1f}x |"
            )
        lines.append("")
    d = result["parts"].get("d")
    if d and "acc" in d:
        lines += [
            "## d) CC on Fashion-MNIST, bf16-mixed, a training budget",
            "",
            f"`{d['command']}`",
            "",
            "| training s | wall s | epochs | ACC | NMI | ARI |",
            "|---|---|---|---|---|---|",
            f"| {d['train_seconds']} | {d['wall_seconds']:.0f} | {d['epochs']} | {_f(d['acc'])} | "
            f"{_f(d['nmi'])} | {_f(d['ari'])} |",
            "",
        ]
    e = result["parts"].get("e")
    if e and "rows" in e:
        lines += [
            "## e) Host syncs per steady training step (digits configs)",
            "",
            "| method | steps counted | HostSyncCounter / step | CUDA sync warnings / step |",
            "|---|---|---|---|",
        ]
        for r in e["rows"]:
            lines.append(
                f"| {r['method']} | {r['steps']} | {r['host_syncs_per_step']:g} | "
                f"{r['cuda_sync_warnings_per_step']:g} |"
            )
        lines.append("")
    failed = {k: v["error"] for k, v in result["parts"].items() if "error" in v}
    if failed:
        lines += ["## Parts that failed", ""] + [f"- {k}: `{v.splitlines()[-1]}`" for k, v in failed.items()]
        lines.append("")
    return "\n".join(lines)


def _f(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data_root", default="/usr/share/datasets/fashion-mnist")
    # Cheapest first, so that a run stopped at the call's time limit keeps the most parts.
    parser.add_argument("--parts", nargs="+", default=list("ecbda"), choices=list("abcde"))
    parser.add_argument("--quick", action="store_true", help="toy sizes on the CPU (make test)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.chdir(REPO)  # the configs are named relative to the repository
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    sizes = Sizes(args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": command_line(None if argv is None else ["benchmarks/device/measure.py", *argv]),
        "device": device,
        "quick": args.quick,
        "machine": machine(device),
        "parts": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="clusterlab-device-"))
    for part in args.parts:
        start = time.perf_counter()
        print(f"part {part} ...", flush=True)
        try:
            if part == "a":
                value = part_a(sizes, args.data_root, device)
            elif part == "b":
                value = part_b(sizes, args.data_root, device)
            elif part == "c":
                value = part_c(sizes, device)
            elif part == "d":
                value = part_d(sizes, args.data_root, device, scratch / "d")
            else:
                value = part_e(sizes, device, scratch)
        except Exception:  # keep the other parts' figures; this one says why it has none
            value = {"error": traceback.format_exc()}
            print(value["error"], flush=True)
        value["seconds"] = time.perf_counter() - start
        result["parts"][part] = value
        (out / "device.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "device.md").write_text(markdown(result))
        print(f"part {part}: {value['seconds']:.0f} s", flush=True)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
