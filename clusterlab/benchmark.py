"""Run a suite of experiments over seeds and write a paper-style table into docs/results.md.

    python -m clusterlab.benchmark benchmarks/suites/digits.yaml --seeds 0 1 2
    python -m clusterlab.benchmark benchmarks/suites/fashion_mnist.yaml --seeds 0 1 2 --budget_minutes 10

A suite file names the methods and, for each, the configs of its stages, run in order with the same
seed (NNM: the SimCLR pretext, then NNM, which finds the pretext's checkpoint through its config),
with the suite's `args`, the method's own `args` (ablations are methods that differ only in their
`args`) and a stage's own (a stage given as `{config: ..., args: [...], budget_share: f}`; a stage's
`budget_share` is its fraction of --budget_minutes: NNM's pretext and clustering stages take 0.5 each,
so that the method as a whole has the budget). Every run is a plain
`clusterlab fit`. The table is computed from the runs' metrics.json files: rows are the methods plus
k-means on the same images; columns are NMI / ACC / ARI as mean +- std over the seeds, and the fit
time per run. It replaces the suite's block in docs/results.md (between `<!-- benchmark:<key> -->`
markers) together with the exact command and the machine. The per-run figures and the paths of their
metrics.json go to benchmarks/results/<key>.json, so that the table can be checked against the runs.
Each finished (method, seed) is also recorded in benchmarks/results/<key>.progress.json as it ends;
`--resume` takes the runs found there (same seed, arguments and config files' contents, the shared
blocks a config names included: `config_digest`) instead of running them again. Each run writes
its directory's path into the file that the runner names in CLUSTERLAB_RUN_DIR_FILE
(clusterlab.run_folder), kept in <key>.started/ beside the progress file: with `--resume` a stage
that finished inside an unfinished method (NNM's pretext) is taken as it is, and a stage that was
killed after a checkpoint continues from it (`--ckpt_path`, in its own directory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from clusterlab.console import OneLineParser

METRICS = ("nmi", "acc", "ari")
# Columns added where every run of a row records them (runs before they were computed do not):
# AMI and many-to-one ACC (clusterlab.metrics), the score of over-clustering.
EXTRA_METRICS = {"ami": "AMI", "many_to_one_acc": "ACC many-to-one"}


def run_stage(
    config: str,
    seed: int,
    extra: list[str],
    runs_dir: str,
    threads: int | None = None,
    timeout: float | None = None,
    told: Path | None = None,
) -> Path:
    """`clusterlab fit` of one config and seed (on `threads` CPU threads, stopped after `timeout`
    seconds); returns its run directory. `told`: the file the run writes its directory's path into
    as it starts (a scratch file by default); one that outlives the runner lets `--resume` find a
    stage that was killed."""
    name = Path(config).stem
    command = [
        sys.executable,
        "-m",
        "clusterlab",
        "fit",
        "--config",
        config,
        "--seed_everything",
        str(seed),
        "--runs_dir",
        runs_dir,
        *extra,
    ]
    print("$", shlex.join(["clusterlab", *command[3:]]), flush=True)
    from clusterlab.run_folder import RUN_DIR_FILE_ENV  # lazily: it imports Lightning

    # The run writes its directory's path into this file (runs of one config and seed at the same
    # time get suffixed directories, so the name alone cannot tell them apart).
    with tempfile.TemporaryDirectory(prefix="clusterlab-benchmark-") as scratch:
        told = told or Path(scratch) / "run_dir"
        told.unlink(missing_ok=True)  # what an earlier run wrote there is not this run's
        env = {**os.environ, "COLUMNS": "200", RUN_DIR_FILE_ENV: str(told)}
        env.update({"OMP_NUM_THREADS": str(threads)} if threads else {})
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        run_dir = told.read_text().strip() if told.is_file() else ""
    if done.returncode != 0:
        raise RuntimeError(f"{config} seed {seed} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    if not run_dir or not (Path(run_dir) / "metrics.json").is_file():
        raise RuntimeError(f"{config} seed {seed}: no metrics.json written under {runs_dir}/{name}")
    return Path(run_dir)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def worst(accs: list[float], seeds: list[int]) -> tuple[float, int]:
    """The lowest ACC over the seeds and its seed: a table is a distribution, not a best run."""
    return min(zip(accs, seeds))


def recorded_extras(results: list[dict]) -> dict:
    """Mean and std of each extra metric that every one of `results` records."""
    return {m: mean_std([r[m] for r in results]) for m in EXTRA_METRICS if all(m in r for r in results)}


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Table rows from the runs' metrics: k-means first, then the methods in suite order."""
    rows = []
    first = next(iter(runs.values()))
    if all("kmeans" in r for r in first):
        seeds = [r["seed"] for r in first]
        rows.append(
            {
                "name": "k-means (pixels)",
                **{m: mean_std([r["kmeans"][m] for r in first]) for m in METRICS},
                **recorded_extras([r["kmeans"] for r in first]),
                "worst_acc": worst([r["kmeans"]["acc"] for r in first], seeds),
                "wall_time_s": None,
                "seeds": seeds,
            }
        )
    for name, method_runs in runs.items():
        seeds = [r["seed"] for r in method_runs]
        rows.append(
            {
                "name": name,
                **{m: mean_std([r[m] for r in method_runs]) for m in METRICS},
                **recorded_extras(method_runs),
                "worst_acc": worst([r["acc"] for r in method_runs], seeds),
                "wall_time_s": statistics.mean(r["wall_time_s"] for r in method_runs),
                "seeds": seeds,
            }
        )
    return rows


def markdown(suite: dict, rows: list[dict], command: str, machine: str) -> str:
    lines = [f"### {suite['title']}", "", f"Machine: {machine}.", "", "```", command, "```", ""]
    if suite.get("note"):
        lines += [suite["note"].strip(), ""]
    extras = [m for m in EXTRA_METRICS if any(m in row for row in rows)]
    names = ["NMI", "ACC", "ARI", *(EXTRA_METRICS[m] for m in extras)]
    header = f"| method | {' | '.join(names)} | worst ACC (seed) | fit time per run | seeds |"
    lines += [header, "|---" * (len(names) + 4) + "|"]
    for row in rows:
        one_seed = len(row["seeds"]) == 1  # no spread to report
        cells = [
            "-" if m not in row else f"{row[m][0]:.4f}" if one_seed else f"{row[m][0]:.4f} +- {row[m][1]:.4f}"
            for m in (*METRICS, *extras)
        ]
        low, low_seed = row["worst_acc"]
        wall = f"{row['wall_time_s']:.0f} s" if row["wall_time_s"] is not None else ""
        seeds = ", ".join(map(str, row["seeds"]))
        lines.append(f"| {row['name']} | {' | '.join(cells)} | {low:.4f} ({low_seed}) | {wall} | {seeds} |")
    for anchor in suite.get("anchors", []):
        cells = [f"{anchor[m]:.3f}" if anchor.get(m) is not None else "-" for m in (*METRICS, *extras)]
        lines.append(f"| {anchor['name']} (published) | {' | '.join(cells)} | | | |")
    return "\n".join(lines) + "\n"


def write_block(results: Path, key: str, block: str) -> None:
    """Replace (or append) the suite's block in the results file."""
    start, end = f"<!-- benchmark:{key} -->", f"<!-- /benchmark:{key} -->"
    text = results.read_text() if results.exists() else "# Results\n"
    body = f"{start}\n{block}{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: body, text)
        if pattern.search(text)
        else text.rstrip("\n") + "\n\n" + body + "\n"
    )
    results.write_text(text)


def gpu() -> str:
    """The first CUDA device's name, or "no GPU"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def describe_machine(*details: str) -> str:
    """The architecture and CPU cores, then `details` (threads, GPU, torch version...): the "machine"
    of every results file, the runner's and the benchmark scripts' (benchmarks/record.py)."""
    return ", ".join([platform.machine(), f"{os.cpu_count()} CPU cores", *details])


def machine(threads: int | None = None) -> str:
    return describe_machine(*([f"{threads} thread(s) per run"] if threads else []), gpu())


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """The command line, checked, and the suite file it names, read."""
    parser = OneLineParser(prog="python -m clusterlab.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", help="suite file (benchmarks/suites/*.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--budget_minutes",
        type=float,
        default=None,
        help="stop each stage's training after this many minutes (trainer.max_time)",
    )
    parser.add_argument("--results", default="docs/results.md", help="markdown file to write the table into")
    parser.add_argument("--runs_dir", default="runs")
    parser.add_argument("--json_dir", default="benchmarks/results")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods of the suite")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="(method, seed) runs at a time, each on cores/jobs threads (NNM's stages stay in order)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished runs recorded in <json_dir>/<key>.progress.json; continue killed ones",
    )
    args = parser.parse_args(argv)
    if args.budget_minutes is not None and not 0 < args.budget_minutes < float("inf"):
        parser.error(f"--budget_minutes {args.budget_minutes:g}: give a number of minutes above 0")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: run at least 1 job at a time")
    if not Path(args.suite).is_file():
        parser.error(f"the suite file {args.suite} does not exist (the suites: benchmarks/suites/*.yaml)")

    suite = yaml.safe_load(Path(args.suite).read_text())
    unknown = sorted(set(args.methods or []) - {m["name"] for m in suite["methods"]})
    if unknown:
        parser.error(
            f"--methods {' '.join(unknown)}: not in {args.suite} (its methods: "
            f"{', '.join(m['name'] for m in suite['methods'])})"
        )
    return args, suite


def budget(minutes: float | None, share: float) -> list[str]:
    """The `--trainer.max_time` arguments of a stage that takes `share` of `minutes` (none: no limit)."""
    if not minutes:
        return []
    seconds = int(minutes * 60 * share)
    hms = f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return ["--trainer.max_time", f"00:{hms}"]


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def config_files(config: str | Path) -> list[Path]:
    """A config file, then every config file it names, each once: a value that is the path of a
    YAML or JSON file, relative to the directory of the file that names it, as jsonargparse reads
    it (`backbone: base/backbone_cnn_digits.yaml` in experiments/*.yaml), and the files those name."""

    def strings(node):
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            for item in node:
                yield from strings(item)
        elif isinstance(node, str):
            yield node

    files: list[Path] = []
    todo = [Path(config)]
    while todo:
        path = Path(os.path.normpath(todo.pop(0)))
        if path in files:
            continue
        files.append(path)
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue  # not YAML: the run itself will say so; its bytes are still hashed
        named = (path.parent / value for value in strings(content) if value.endswith(CONFIG_SUFFIXES))
        todo += [file for file in named if file.is_file()]
    return files


def config_digest(config: str | Path) -> str:
    """What identifies a config's contents in the progress file: the SHA-256 of its bytes, updated
    with the name and SHA-256 of every file it names (`config_files`), so that an edit of a shared
    block in experiments/base/ is a new config for every config that uses it. A config that names
    no file keeps the digest of its bytes alone."""
    top, *named = config_files(config)
    digest = hashlib.sha256(top.read_bytes())
    for path in named:  # named as from the config's directory, wherever the runner is started
        name = os.path.relpath(path, top.parent).encode()
        digest.update(b"\0" + name + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@dataclass
class Plan:
    """What every (method, seed) run of a suite shares: the suite's arguments, the budget, where
    runs go, the threads of each, and the progress file with the runs finished so far."""

    extra: list[str]
    budget_minutes: float | None
    runs_dir: str
    threads: int | None
    progress_file: Path
    done: dict
    resume: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self, key: str, stage: int) -> Path:
        """Where a stage's run writes its directory as it starts: beside the progress file, so that
        `--resume` finds the stages that finished, or were killed, before their method ended."""
        name = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.progress_file.parent / f"{self.progress_file.stem}.started" / f"{name}-{stage}"


def interrupted(told: Path) -> tuple[Path | None, list[str]]:
    """What `--resume` does with a stage whose run started before: (its finished run directory,
    []) when it wrote metrics.json; (None, ["--ckpt_path", its last.ckpt]) when it was stopped
    after a checkpoint, so that it continues in its own directory; (None, []) otherwise."""
    run_dir = Path(told.read_text().strip()) if told.is_file() else None
    if run_dir is None:
        return None, []
    if (run_dir / "metrics.json").is_file():
        return run_dir, []
    last = run_dir / "checkpoints" / "last.ckpt"
    return None, (["--ckpt_path", str(last)] if last.is_file() else [])


def run_method(plan: Plan, method: dict, seed: int) -> dict:
    """Every stage of one method for one seed, in order (or the finished run the progress file
    records for the same seed, arguments and config files' contents); returns the last stage's
    metrics, with the wall time of all stages."""
    method_extra = plan.extra + list(method.get("args", []))
    stages = [{"config": s, "args": []} if isinstance(s, str) else s for s in method["stages"]]
    contents = [config_digest(s["config"]) for s in stages]
    key = json.dumps(
        [method["name"], method["stages"], contents, method_extra, budget(plan.budget_minutes, 1.0), seed]
    )
    if key in plan.done:
        final = plan.done[key]
        print(f"  {method['name']} seed {seed}: from {plan.progress_file} ({final['run_dir']})", flush=True)
    else:
        reports = []
        for index, stage in enumerate(stages):
            stage_args = budget(plan.budget_minutes, stage.get("budget_share", 1.0)) + list(
                stage.get("args", [])
            )
            told = plan.started(key, index)
            told.parent.mkdir(parents=True, exist_ok=True)
            run_dir, continued = interrupted(told) if plan.resume else (None, [])
            if run_dir is None:  # a new run, or a killed one continued from its checkpoint
                args = method_extra + stage_args + continued
                run_dir = run_stage(stage["config"], seed, args, plan.runs_dir, plan.threads, told=told)
            reports.append({**json.loads((run_dir / "metrics.json").read_text()), "run_dir": str(run_dir)})
        final = dict(reports[-1])
        final["wall_time_s"] = sum(r["wall_time_s"] for r in reports)  # all stages of the method
        final["stage_runs"] = [r["run_dir"] for r in reports]
        with plan.lock:  # the progress file records every finished run as it ends
            plan.done[key] = final
            plan.progress_file.write_text(json.dumps(plan.done, indent=2) + "\n")
    print(
        f"  {method['name']} seed {seed}: " + ", ".join(f"{m} {final[m]:.4f}" for m in METRICS),
        flush=True,
    )
    return final


def main(argv: list[str] | None = None) -> dict:
    args, suite = parse_args(argv)
    command = "python -m clusterlab.benchmark " + shlex.join(sys.argv[1:] if argv is None else argv)
    Path(args.json_dir).mkdir(parents=True, exist_ok=True)
    progress_file = Path(args.json_dir) / f"{suite['key']}.progress.json"
    plan = Plan(
        extra=list(suite.get("args", [])),
        budget_minutes=args.budget_minutes,
        runs_dir=args.runs_dir,
        threads=max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None,
        progress_file=progress_file,
        done=json.loads(progress_file.read_text()) if args.resume and progress_file.exists() else {},
        resume=args.resume,
    )
    methods = [m for m in suite["methods"] if args.methods is None or m["name"] in args.methods]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {
            m["name"]: [pool.submit(run_method, plan, m, seed) for seed in args.seeds] for m in methods
        }
        runs: dict[str, list[dict]] = {name: [f.result() for f in fs] for name, fs in futures.items()}

    rows = summarize(runs)
    write_block(Path(args.results), suite["key"], markdown(suite, rows, command, machine(plan.threads)))
    record = {
        "suite": args.suite,
        "command": command,
        "machine": machine(plan.threads),
        "rows": rows,
        "runs": runs,
    }
    (Path(args.json_dir) / f"{suite['key']}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"Table written to {args.results} (block {suite['key']}); runs listed in "
        f"{args.json_dir}/{suite['key']}.json"
    )
    return record


if __name__ == "__main__":
    main()
