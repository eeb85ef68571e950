"""`clusterlab`: the Lightning CLI, with a run directory per run and a clustering report.

    clusterlab fit --config experiments/cc_digits.yaml [--seed_everything 1] [--trainer.max_epochs 50]
    clusterlab fit --config experiments/cc_digits.yaml --ckpt_path last      # continue the latest run
    clusterlab test --config runs/cc_digits/<run>/config.yaml --ckpt_path runs/cc_digits/<run>/checkpoints/last.ckpt
    clusterlab fit --config experiments/cc_cifar10.yaml --print_config

Each run writes into runs/<name>/<timestamp>-seed<S>/: config.yaml (the resolved config),
checkpoints/last.ckpt, metrics.csv, wandb/ (offline unless you are logged in) and, after `fit`,
metrics.json: the final ACC / NMI / ARI of every head and of the selected one, next to k-means
on the same images, with epochs, seed and wall time.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from clusterlab.callbacks.assignments import Assignments
from clusterlab.callbacks.figures import ClusterFigures
from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.methods.base import ClusteringMethod

RUN_DIR_ENV = "CLUSTERLAB_RUN_DIR"  # hands rank 0's run directory to the DDP processes it launches


class ClusterLabParser(LightningArgumentParser):
    """Says what is wrong with a config in one message, without the usage dump."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        known = [a.dest for a in parser._actions if a.dest and a.dest != "help"]
        sys.stderr.write(f"{prog}: error: {explain_config_error(message, known)}\n"
                         f"(all options: {prog} --help)\n")  # fmt: skip
        sys.exit(2)


def explain_config_error(message: str, known_keys: list[str]) -> str:
    """Turn jsonargparse's nested report of a bad key into: which key, of which class, what was meant."""
    unknown = re.search(r"Option '([^']+)' is not accepted", message)
    if unknown:
        before = message[: unknown.start()]
        option, keys = unknown.group(1), re.findall(r'Parser key "([^"]+)"', before)
        owner = (re.findall(r"class_path '([^']+)'", before) or [None])[-1]
        key = ".init_args.".join([*keys, option])
        accepted = _init_parameters(owner) if owner else []
        hint = difflib.get_close_matches(option, accepted, 1)
        return (f"unknown config key '{key}': {owner} has no option '{option}'."
                + (f" Did you mean '{hint[0]}'?" if hint else "")
                + (f" Its options: {', '.join(accepted)}." if accepted else ""))  # fmt: skip
    for pattern in (r"does not accept option '([^']+)'", r"unrecognized arguments: --([^\s=]+)"):
        found = re.search(pattern, message)
        if found:
            key = found.group(1)
            hint = difflib.get_close_matches(key, known_keys, 1, cutoff=0.75)
            return f"unknown config key '{key}'." + (f" Did you mean '{hint[0]}'?" if hint else "")
    return message


def _init_parameters(class_path: str) -> list[str]:
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


class ClusterLabCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True) -> None:
        self._started = 0.0
        super().__init__(
            ClusteringMethod,
            ClusterDataModule,
            subclass_mode_model=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            seed_everything_default=0,
            parser_class=ClusterLabParser,
            trainer_defaults={
                "logger": [
                    {"class_path": "clusterlab.loggers.CSVLogger"},
                    {"class_path": "clusterlab.loggers.WandbLogger"},
                ],
                "log_every_n_steps": 5,
            },
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_clusters", "model.init_args.num_clusters", apply_on="instantiate")
        parser.add_argument("--name", type=str | None, default=None,
                            help="Run name: runs go to <runs_dir>/<name>/. Default: the config file's name.")
        parser.add_argument("--runs_dir", type=str, default="runs", help="Where run directories are made.")
        parser.add_argument("--kmeans_baseline", type=bool, default=True,
                            help="After fit, also report k-means on the pixels of the evaluation set.")  # fmt: skip
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # Keep the newest epoch checkpoint; last.ckpt links to it.
        parser.set_defaults({"checkpoint.save_last": "link", "checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")
        parser.add_lightning_class_args(ClusterFigures, "figures")
        parser.add_lightning_class_args(Assignments, "assignments")

    # -- run directory ----------------------------------------------------------------------

    def _subconfig(self):
        return self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        name = config.name or _config_name(config) or "run"
        runs = Path(config.runs_dir) / name
        ckpt_path = config.get("ckpt_path")
        if self.subcommand == "fit" and ckpt_path == "last":
            config.ckpt_path = str(_latest_checkpoint(runs))
            ckpt_path = config.ckpt_path
        run_dir = os.environ.get(RUN_DIR_ENV) if os.environ.get("LOCAL_RANK", "0") != "0" else None
        if run_dir is None:
            continuing = self.subcommand == "fit" and ckpt_path and Path(ckpt_path).parent.name == "checkpoints"
            if continuing:  # a resumed run keeps writing into its own directory
                run_dir = str(Path(ckpt_path).parent.parent)
            else:
                stage = "" if self.subcommand in ("fit", None) else f"-{self.subcommand}"
                run_dir = str(_new_run_dir(runs, f"{time.strftime('%Y%m%d-%H%M%S')}{stage}-seed{config.seed_everything}"))
            os.environ[RUN_DIR_ENV] = run_dir
        self.run_dir = Path(run_dir)

        if self.subcommand == "predict" and config.data.dataset == "image_folder" and ckpt_path:
            _folder_input_from_checkpoint(config.data, ckpt_path)
        config.trainer.default_root_dir = run_dir
        config.checkpoint.dirpath = str(self.run_dir / "checkpoints")
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        for logger in loggers:
            args = getattr(logger, "init_args", None)
            if args is not None and "save_dir" in args and not args.save_dir:
                args.save_dir = run_dir
            if args is not None and "name" in args and not args.name:
                args.name = f"{name}/{self.run_dir.name}"

    # -- fit report -------------------------------------------------------------------------

    def _start_clock(self) -> None:
        self._started = time.time()

    before_fit = before_validate = before_test = _start_clock

    def after_fit(self) -> None:
        wall_time = time.time() - self._started
        if self.trainer.interrupted:
            return
        # Evaluate the final weights, whatever the validation schedule was.
        self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        self._write_report("fit", wall_time)

    def after_validate(self) -> None:
        self._write_report("validate", time.time() - self._started)

    def after_test(self) -> None:
        self._write_report("test", time.time() - self._started)

    @rank_zero_only
    def _write_report(self, stage: str, wall_time: float) -> None:
        config = self._subconfig()
        model, data = self.model, self.datamodule
        epochs = self.trainer.current_epoch if stage == "fit" else model.checkpoint_epochs
        report = {
            "stage": stage,
            "method": type(model).__name__,
            "dataset": data.hparams.dataset,
            "train_split": data.hparams.train_split,
            "eval_split": data.eval_split,
            "num_samples": len(data.eval_set),
            "num_clusters": model.num_clusters,
            "seed": config.seed_everything,
            "epochs": epochs,
            "steps": self.trainer.global_step if stage == "fit" else None,
            "wall_time_s": round(wall_time, 1),
            "devices": self.trainer.world_size,
            **{k: model.eval_results.get(k) for k in ("acc", "nmi", "ari", "selected_head", "heads")},
            **({"diagnostics": model.diagnostics} if model.diagnostics else {}),
            "config": "config.yaml",
            "checkpoint": "checkpoints/last.ckpt" if stage == "fit" else config.get("ckpt_path"),
            "command": "clusterlab " + shlex.join(sys.argv[1:]),
        }
        if config.kmeans_baseline and data.eval_set.labels.ge(0).any():
            report["kmeans"] = kmeans_baseline(data.eval_set.images, data.eval_set.labels, model.num_clusters,
                                               seed=config.seed_everything)  # fmt: skip
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        print_report(report, self.run_dir)


def kmeans_baseline(images: torch.Tensor, labels: torch.Tensor, num_clusters: int, seed: int = 0) -> dict:
    """k-means on the raw pixels (scaled to [0, 1]) of the evaluation set: the baseline row."""
    from clusterlab.metrics import evaluate
    from clusterlab.neighbors import kmeans

    assignments, _ = kmeans(images.flatten(1).float() / 255.0, num_clusters, seed=seed)
    return evaluate(assignments, labels)


def print_report(report: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    stage = "" if report["stage"] == "fit" else f" [{report['stage']}]"
    console.print(f"[bold]{report['method']}{stage}[/bold] on {report['dataset']} ({report['eval_split']}, "
                  f"{report['num_samples']} images): seed {report['seed']}, {report['epochs']} epochs, "
                  f"{report['wall_time_s']:.0f} s", highlight=False)  # fmt: skip
    table = Table()
    for column in ("", "ACC", "NMI", "ARI"):
        table.add_column(column, justify="left" if not column else "right")

    def row(label: str, results: dict) -> None:
        table.add_row(label, *(f"{results[k]:.4f}" if results.get(k) is not None else "-" for k in ("acc", "nmi", "ari")))

    heads = report.get("heads") or []
    for h, results in enumerate(heads):
        selected = " (selected)" if h == report["selected_head"] and len(heads) > 1 else ""
        row(f"{report['method']} head {h}{selected}", results)
    if "kmeans" in report:
        row("k-means (pixels)", report["kmeans"])
    console.print(table)
    for name, value in (report.get("diagnostics") or {}).items():
        console.print(f"{name}: {value:.4f}", highlight=False)
    console.print(f"Run directory: {run_dir}  (metrics.json, config.yaml, checkpoints/)")


def _folder_input_from_checkpoint(data, ckpt_path: str) -> None:
    """Decode a folder to the size and channels the checkpoint's model was trained on, and take its
    number of clusters (an unlabeled folder has no classes to count), unless given."""
    if not Path(ckpt_path).is_file():
        return
    meta = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("clusterlab") or {}
    data.num_clusters = data.num_clusters or meta.get("num_clusters")
    shape = meta.get("input_shape")
    if shape:
        data.channels = data.channels or shape[0]
        data.image_size = data.image_size or shape[-1]


def _config_name(config) -> str | None:
    paths = config.get("config") or []
    return Path(str(paths[-1])).stem if paths else None


def _latest_checkpoint(runs: Path) -> Path:
    found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"clusterlab: error: --ckpt_path last: no run of this name to continue (no {runs}/*/checkpoints/last.ckpt)")
    return found[-1]


def _new_run_dir(runs: Path, stem: str) -> Path:
    candidate, n = runs / stem, 1
    while candidate.exists():
        n += 1
        candidate = runs / f"{stem}-{n}"
    return candidate


def main(args=None) -> None:
    warnings.filterwarnings("ignore", message=".*Sparse invariant checks.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    ClusterLabCLI(args=args)


if __name__ == "__main__":
    main()
