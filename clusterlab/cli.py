"""`clusterlab`: the Lightning CLI, with a run directory per run and a clustering report.

    clusterlab fit --config experiments/cc_digits.yaml [--seed_everything 1] [--trainer.max_epochs 50]
    clusterlab fit --config experiments/cc_digits.yaml --ckpt_path last      # continue the latest run
    clusterlab test --config runs/cc_digits/<run>/config.yaml \
        --ckpt_path runs/cc_digits/<run>/checkpoints/last.ckpt
    clusterlab fit --config experiments/cc_cifar10.yaml --print_config
    clusterlab env [--json]        # versions, GPUs, bf16 / TF32, the faiss build (clusterlab.env)

Each fit writes into runs/<name>/<timestamp>-seed<S>/ (clusterlab.runs): config.yaml (the resolved
config, loadable by every subcommand), checkpoints/last.ckpt (after every epoch), metrics.csv,
wandb/ (offline unless you are logged in) and, at the end, metrics.json: the final ACC / NMI / ARI
of every head and of the selected one, next to k-means on the same images, with epochs, seed and
wall time. `validate`, `test` and `predict` of a run's checkpoint write into a directory of their
own inside that run, so they never touch the fit's files.

A user error (a missing data set, an unreadable checkpoint or image, a checkpoint of another
method, an unwritable output, a diverged run) is one line and exit code 1; `--debug` (or
CLUSTERLAB_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import difflib
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from lightning_fabric.plugins.collectives.torch_collective import default_pg_timeout
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only

from clusterlab import runs
from clusterlab.callbacks.assignments import Assignments
from clusterlab.callbacks.figures import ClusterFigures
from clusterlab.callbacks.speed import Speed
from clusterlab.checkpointing import EpochRowFirst
from clusterlab.config_checks import check_checkpoint_model, check_config, class_signature
from clusterlab.console import plain, quiet_libraries
from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.distributed import process_group_timeout
from clusterlab.errors import CheckpointError, OutputError, UserError, disk_full
from clusterlab.methods.base import ClusteringMethod

# Keys that belong to one subcommand only: a saved config leaves them out, so that it loads in all.
_STAGE_KEYS = ("ckpt_path", "verbose", "return_predictions")


class ClusterLabParser(LightningArgumentParser):
    """Says what is wrong with a config in one message, without the usage dump."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        known = [a.dest for a in parser._actions if a.dest and a.dest != "help"]
        sys.stderr.write(
            f"{prog}: error: {explain_config_error(message, known)}\n(all options: {prog} --help)\n"
        )
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
        return (
            f"unknown config key '{key}': {owner} has no option '{option}'."
            + (f" Did you mean '{hint[0]}'?" if hint else "")
            + (f" Its options: {', '.join(accepted)}." if accepted else "")
        )
    for pattern in (r"does not accept option '([^']+)'", r"unrecognized arguments: --([^\s=]+)"):
        found = re.search(pattern, message)
        if found:
            key = found.group(1)
            hint = difflib.get_close_matches(key, known_keys, 1, cutoff=0.75)
            return f"unknown config key '{key}'." + (f" Did you mean '{hint[0]}'?" if hint else "")
    return message


def _init_parameters(class_path: str) -> list[str]:
    signature = class_signature(class_path)
    return [p for p in signature.parameters if p not in ("self", "args", "kwargs")] if signature else []


class ClusterLabCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True) -> None:
        self._started = 0.0
        self.checkpoint_meta: dict | None = None
        super().__init__(
            ClusteringMethod,
            ClusterDataModule,
            subclass_mode_model=True,
            save_config_callback=None,  # the run's config.yaml is written when its directory is made
            auto_configure_optimizers=False,
            seed_everything_default=0,
            parser_class=ClusterLabParser,
            trainer_defaults={
                "logger": [
                    {"class_path": "clusterlab.loggers.CSVLogger"},
                    {"class_path": "clusterlab.loggers.WandbLogger"},
                ],
                "log_every_n_steps": 5,
                # The data module shards every loader itself (seeded, unpadded, chunked): Lightning
                # must not put a sampler of its own in.
                "use_distributed_sampler": False,
                "plugins": [{"class_path": "clusterlab.checkpointing.AtomicCheckpointIO"}],
            },
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_clusters", "model.init_args.num_clusters", apply_on="instantiate")
        # The data's channels are the backbone's input channels: one setting, not two.
        parser.link_arguments(
            "data.input_channels", "model.init_args.backbone.init_args.in_channels", apply_on="instantiate"
        )
        parser.add_argument(
            "--name",
            type=str | None,
            default=None,
            help="Run name: runs go to <runs_dir>/<name>/. Default: the config file's name.",
        )
        parser.add_argument("--runs_dir", type=str, default="runs", help="Where run directories are made.")
        parser.add_argument(
            "--kmeans_baseline",
            type=bool,
            default=True,
            help="After fit, also report k-means on the pixels of the evaluation set.",
        )
        parser.add_argument(
            "--checkpoint_every_minutes",
            type=float | None,
            default=None,
            help="Also write last.ckpt every this many minutes inside an epoch (for long epochs); a run "
            "resumed from such a checkpoint continues with the next batch of that epoch.",
        )
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # last.ckpt after every training epoch, replaced atomically (clusterlab.checkpointing): a
        # kill loses at most the epoch in progress.
        parser.set_defaults(
            {
                "checkpoint.filename": "last",  # the one checkpoint kept (save_top_k 1, no monitor)
                "checkpoint.save_top_k": 1,
                "checkpoint.every_n_epochs": 1,
                "checkpoint.save_on_train_epoch_end": True,
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")
        parser.add_lightning_class_args(ClusterFigures, "figures")
        parser.add_lightning_class_args(Assignments, "assignments")
        parser.add_lightning_class_args(Speed, "speed")  # channels_last, cuDNN autotuning, TF32, compile

    # -- the run directory ------------------------------------------------------------------

    def _subconfig(self):
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config  # run=False: no subcommand

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """After parsing and before anything is built: the checkpoint is checked against the config
        and the run directory is made, on rank 0, and every process of the run agrees on both."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand") or "fit"
        config = self._subconfig()
        check_config(config)  # before a run folder is made or data is read
        name = config.name or _config_name(config) or "run"
        portable = _portable_config(parser, self.config, name)
        decision = runs.agree(lambda: _decide_run(subcommand, config, name, portable))
        self.run_dir = Path(decision["run_dir"])
        _current_run.append(self.run_dir)
        self.checkpoint_meta = decision["checkpoint"]
        if "ckpt_path" in config:
            config.ckpt_path = decision["ckpt_path"]

    def before_instantiate_classes(self) -> None:
        config, run_dir = self._subconfig(), str(self.run_dir)
        if (
            self.config.get("subcommand") == "predict"
            and config.data.dataset == "image_folder"
            and self.checkpoint_meta
        ):
            _folder_input_from_checkpoint(config.data, self.checkpoint_meta)
        config.trainer.default_root_dir = run_dir
        config.checkpoint.dirpath = str(self.run_dir / "checkpoints")
        loggers = (
            config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        )
        for logger in loggers:
            args = getattr(logger, "init_args", None)
            if args is not None and "save_dir" in args:
                args.save_dir = run_dir
            if args is not None and "name" in args and not args.name:
                args.name = f"{self.run_dir.parent.name}/{self.run_dir.name}"

    def after_instantiate_classes(self) -> None:
        # The process group is made later (trainer.fit): a DDP strategy left at Lightning's 30-minute
        # default waits clusterlab's PROCESS_GROUP_TIMEOUT instead (rank 0's k-means and neighbour
        # searches, while the other ranks wait in a broadcast); one the config set is kept.
        strategy = self.trainer.strategy
        if getattr(strategy, "_timeout", None) == default_pg_timeout:
            strategy._timeout = process_group_timeout()
        minutes = self._subconfig().get("checkpoint_every_minutes")
        if minutes:  # a second writer of last.ckpt, inside epochs (Lightning's triggers exclude each other)
            self.trainer.callbacks.append(
                ModelCheckpoint(
                    dirpath=self.run_dir / "checkpoints",
                    filename="last",
                    save_top_k=1,
                    enable_version_counter=False,
                    train_time_interval=timedelta(minutes=minutes),
                    save_on_train_epoch_end=True,
                )
            )

    # -- fit report -------------------------------------------------------------------------

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:  # a user error or a crash while building: the run never started
            _remove_unstarted_run(self.run_dir)
            # jsonargparse wraps what a class's constructor raised in a ValueError of its own, with
            # the whole config in its text: the user error it wraps is the one line to show.
            cause = error
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None and cause is not error:
                raise cause from None
            raise

    def before_fit(self) -> None:
        self._started = time.time()
        # The epoch's epoch-end row reaches metrics.csv before the checkpoint that ends the epoch.
        self.trainer.callbacks.append(EpochRowFirst())
        if self.checkpoint_meta:  # a resumed run: its metrics.csv keeps the rows before the checkpoint, once
            for logger in self.trainer.loggers:
                if hasattr(logger, "continue_from"):
                    logger.continue_from(self.checkpoint_meta)

    def fit(self, model, **kwargs) -> None:
        try:
            self.trainer.fit(model, **kwargs)
        except SystemExit:  # Ctrl-C or SIGTERM: Lightning stops gracefully, then exits
            if self.trainer.interrupted:
                last = self.run_dir / "checkpoints" / "last.ckpt"
                kept = (
                    f"{last} (written at the end of the last whole epoch)"
                    if last.exists()
                    else "no checkpoint yet"
                )
                rank_zero_info(
                    f"Interrupted. The run keeps {kept}; continue it with: clusterlab fit --config "
                    f"{self.run_dir / 'config.yaml'} --ckpt_path last"
                )
            if self.trainer.received_sigterm:
                # Lightning's SIGTERMException exits with code 0; a scheduler or a script would
                # read that as a finished run. 128 + 15, as a process killed by SIGTERM.
                raise SystemExit(143) from None
            raise  # a stop before the first checkpoint keeps its directory: `--ckpt_path last` restarts it
        except Exception:
            # A user error or a crash: without a checkpoint there is nothing to continue, and an
            # empty run directory would only stand in the way of `--ckpt_path last`.
            _remove_unstarted_run(self.run_dir)
            raise

    def _start_clock(self) -> None:
        self._started = time.time()

    before_validate = before_test = before_predict = _start_clock

    def after_fit(self) -> None:
        wall_time = time.time() - self._started
        if self.trainer.interrupted:
            return
        # Evaluate the final weights, whatever the validation schedule was (every rank takes part).
        self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        self._write_report("fit", wall_time)

    def after_validate(self) -> None:
        self._write_report("validate", time.time() - self._started)

    def after_test(self) -> None:
        self._write_report("test", time.time() - self._started)

    @rank_zero_only
    def _write_report(self, stage: str, wall_time: float) -> None:
        """metrics.json and the printed table. Rank 0 only: everything it reads was gathered
        before (model.eval_results), and it calls no collective."""
        config = self._subconfig()
        model, data = self.model, self.datamodule
        meta = self.checkpoint_meta or {}
        results = model.eval_results
        report = {
            "stage": stage,
            "method": type(model).__name__,
            "dataset": data.hparams.dataset,
            "train_split": data.hparams.train_split,
            "eval_split": data.eval_split,
            "num_samples": len(data.eval_set),
            "num_clusters": model.num_clusters,
            "seed": config.seed_everything,
            "epochs": int(model.epochs_trained) if stage == "fit" else meta.get("epochs_trained"),
            "steps": self.trainer.global_step if stage == "fit" else meta.get("global_step"),
            "wall_time_s": round(wall_time, 1),
            "devices": self.trainer.world_size,
            **{k: results.get(k) for k in ("acc", "nmi", "ari", "selected_head", "heads")},
            "cluster_sizes": results.get("cluster_sizes"),
            "collapsed": results.get("collapsed"),
            **({"diagnostics": model.diagnostics} if model.diagnostics else {}),
            "config": "config.yaml",
            "checkpoint": "checkpoints/last.ckpt" if stage == "fit" else config.get("ckpt_path"),
            "command": "clusterlab " + shlex.join(sys.argv[1:]),
            "environment": environment(),
        }
        if config.kmeans_baseline and data.eval_set.labels.ge(0).any():
            report["kmeans"] = kmeans_baseline(
                data.eval_set.images, data.eval_set.labels, model.num_clusters, seed=config.seed_everything
            )
        (self.run_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        print_report(report, self.run_dir)


def environment() -> dict:
    """What a figure depends on besides the code and the seed: recorded in every metrics.json."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


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
    console.print(
        f"[bold]{report['method']}{stage}[/bold] on {report['dataset']} ({report['eval_split']}, "
        f"{report['num_samples']} images): seed {report['seed']}, {report['epochs']} epochs, "
        f"{report['wall_time_s']:.0f} s",
        highlight=False,
    )
    table = Table()
    for column in ("", "ACC", "NMI", "ARI"):
        table.add_column(column, justify="left" if not column else "right")

    def row(label: str, results: dict) -> None:
        table.add_row(
            label,
            *(f"{results[k]:.4f}" if results.get(k) is not None else "-" for k in ("acc", "nmi", "ari")),
        )

    heads = report.get("heads") or []
    for h, results in enumerate(heads):
        selected = " (selected)" if h == report["selected_head"] and len(heads) > 1 else ""
        row(f"{report['method']} head {h}{selected}", results)
    if "kmeans" in report:
        row("k-means (pixels)", report["kmeans"])
    console.print(table)
    for name, value in (report.get("diagnostics") or {}).items():
        console.print(f"{name}: {value:.4f}", highlight=False)
    if report.get("collapsed"):
        sizes = report["cluster_sizes"]
        console.print(
            f"[bold red]Warning: the clusters collapsed[/bold red]: the largest holds {max(sizes)} of "
            f"{sum(sizes)} "
            f"images and {sum(s > 0 for s in sizes)} of {len(sizes)} clusters are used (no label involved). "
            "Lower the learning rate, or train longer.",
            highlight=False,
        )
    console.print(f"Run directory: {run_dir}  (metrics.json, config.yaml, checkpoints/)")


# -- deciding the run (rank 0) ------------------------------------------------------------------

# The fit run directories this process made, to start a run in: the only ones a failed start may
# remove (`_remove_unstarted_run`). Rank 0 alone makes them (clusterlab.runs.agree), so the other
# ranks never remove anything; a run directory continued or started again is never in here.
_MADE_HERE: set[str] = set()

# What a fit writes into its run directory before its first checkpoint: its config, and the
# loggers' files (hparams.yaml, metrics.csv, wandb/). Anything else (a checkpoint, the
# unreadable.csv that an error names, a file put there by someone else) keeps the directory.
_STARTUP_FILES = ("config.yaml", "hparams.yaml", "metrics.csv", "metrics.csv.tmp")


def _remove_unstarted_run(run_dir: Path) -> None:
    """Remove a run directory that this process made and that a start which failed before its first
    checkpoint left with nothing to continue, so that `--ckpt_path last` finds the run that has work.
    A directory holding anything but `_STARTUP_FILES`, an empty checkpoints/ and wandb/ is kept."""
    if str(run_dir) not in _MADE_HERE or not run_dir.is_dir() or run_dir.is_symlink():
        return
    for entry in run_dir.iterdir():
        if entry.is_symlink():
            return
        if entry.is_file() and entry.name in _STARTUP_FILES:
            continue
        empty = entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir())
        if empty or (entry.name == "wandb" and entry.is_dir()):
            continue
        return
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:  # its offline run would go on writing into wandb/
            wandb.finish(exit_code=1)
        except Exception:  # noqa: BLE001 - the error being reported is the run's, not this one
            pass
    # Renamed first, in one step, out of the names `runs.fit_runs` lists: never seen half removed.
    doomed = run_dir.with_name(f".{run_dir.name}.failed-{os.getpid()}")
    try:
        os.rename(run_dir, doomed)
    except OSError:
        return
    _MADE_HERE.discard(str(run_dir))
    shutil.rmtree(doomed, ignore_errors=True)


def _decide_run(subcommand: str, config, name: str, portable: str) -> dict:
    """Resolve `--ckpt_path last`, check the checkpoint against the config, make the run directory
    and write its config.yaml. Runs on rank 0 only (clusterlab.runs.agree)."""
    runs_root = Path(config.runs_dir) / name
    ckpt_path = config.get("ckpt_path")
    run_dir = None
    passed_over: list[Path] = []
    if subcommand == "fit" and ckpt_path == "last":
        previous = runs.fit_runs(runs_root, seed=config.seed_everything)
        if not previous:
            raise UserError(
                "--ckpt_path last: no run of this name to continue (no "
                f"{runs_root}/*-seed{config.seed_everything}/)"
            )
        # The newest run with a checkpoint: a newer one without (stopped before its first epoch
        # ended) holds no work, and must not hide the one that does.
        started = [p for p in previous if (p / "checkpoints" / "last.ckpt").is_file()]
        run_dir = started[-1] if started else previous[-1]
        passed_over = previous[previous.index(run_dir) + 1 :]
        ckpt_path = str(run_dir / "checkpoints" / "last.ckpt") if started else None
        if ckpt_path is None:
            rank_zero_info(
                f"--ckpt_path last: {run_dir} was stopped before its first checkpoint; starting it again"
            )
    meta = None
    if ckpt_path:
        checkpoint = runs.load_checkpoint(ckpt_path, mmap=True)  # once: its identity and its model
        meta = runs.read_checkpoint(ckpt_path, checkpoint)
        check_checkpoint_fits(meta, config, subcommand)
        hparams = checkpoint.get("hyper_parameters") or {}
        check_checkpoint_model(hparams, yaml.safe_load(portable).get("model") or {}, ckpt_path)
    if run_dir is not None and meta is not None:
        newer = ", ".join(p.name for p in passed_over)
        rank_zero_info(
            f"--ckpt_path last: continuing {run_dir} from its checkpoint, {runs.describe_checkpoint(meta)}"
            + (f"; passed over the newer {newer}, stopped before a checkpoint" if passed_over else "")
        )
    if run_dir is None:
        own_run = runs.run_of_checkpoint(ckpt_path)
        if subcommand == "fit" and own_run is not None:
            run_dir = own_run  # a resumed run keeps writing into its own directory
        elif subcommand in runs.STAGES and own_run is not None:
            run_dir = runs.make_run_dir(own_run, f"{subcommand}-{runs.timestamp()}")
        else:
            stage = "" if subcommand == "fit" else f"-{subcommand}"
            run_dir = runs.make_run_dir(runs_root, f"{runs.timestamp()}{stage}-seed{config.seed_everything}")
            if subcommand == "fit":
                _MADE_HERE.add(str(run_dir))
    (run_dir / "config.yaml").write_text(portable)
    return {"run_dir": str(run_dir), "ckpt_path": ckpt_path, "checkpoint": meta}


def check_checkpoint_fits(meta: dict, config, subcommand: str) -> None:
    """A checkpoint of another method, number of clusters or input channels is refused before any work."""
    path = meta["path"]
    if "method" not in meta:
        raise CheckpointError(f"checkpoint {path} was not written by clusterlab (no 'clusterlab' entry)")
    wanted = str(config.model.class_path).rsplit(".", 1)[-1]
    clusters, channels = _configured_input(config.data, subcommand)
    asked = [wanted]
    mismatch = meta["method"] != wanted
    if clusters is not None:
        asked.append(f"{clusters} clusters")
        mismatch |= meta.get("num_clusters") != clusters
    if channels is not None and meta.get("input_shape"):
        asked.append(f"{channels} channels")
        mismatch |= meta["input_shape"][0] != channels
    if mismatch:
        raise CheckpointError(
            f"checkpoint {path} is {runs.describe_checkpoint(meta)}; the config asks for {asked[0]}"
            + (f" ({', '.join(asked[1:])})" if asked[1:] else "")
            + ". Use the config the checkpoint was trained with (its run directory has config.yaml)."
        )


def _configured_input(data, subcommand: str) -> tuple[int | None, int | None]:
    """The number of clusters and the input channels the config implies, where it implies them."""
    from clusterlab.data.sources import SOURCES

    if data.dataset == "image_folder":  # predict on a folder takes both from the checkpoint
        return data.num_clusters, data.channels
    source = SOURCES[data.dataset]
    return data.num_clusters or len(source.classes), source.channels


def _portable_config(parser, config, name: str) -> str:
    """The config as YAML that `fit`, `validate`, `test` and `predict` all load: without the keys of
    one subcommand, without the run's own paths (each run fills in its own), with the run's name."""
    subcommand = config.get("subcommand")
    dumped = yaml.safe_load(parser.dump(config))
    if subcommand:
        dumped = dumped[subcommand]
    for key in _STAGE_KEYS:
        dumped.pop(key, None)
    dumped["name"] = name
    trainer = dumped.get("trainer") or {}
    trainer["default_root_dir"] = None
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and isinstance(logger.get("init_args"), dict):
            logger["init_args"].pop("save_dir", None)
    if isinstance(dumped.get("checkpoint"), dict):
        dumped["checkpoint"]["dirpath"] = None
    return yaml.safe_dump(dumped, sort_keys=False)


def _folder_input_from_checkpoint(data, meta: dict) -> None:
    """Decode a folder to the size and channels the checkpoint's model was trained on, and take its
    number of clusters (an unlabeled folder has no classes to count), unless given."""
    data.num_clusters = data.num_clusters or meta.get("num_clusters")
    shape = meta.get("input_shape")
    if shape:
        data.channels = data.channels or shape[0]
        data.image_size = data.image_size or shape[-1]


def _config_name(config) -> str | None:
    paths = config.get("config") or []
    return Path(str(paths[-1])).stem if paths else None


# -- the command ----------------------------------------------------------------------------------


def main(args: list[str] | None = None) -> None:
    """`clusterlab ...`: user errors are one line and exit code 1 (`--debug`: the traceback)."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("CLUSTERLAB_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not debug:
        quiet_libraries()
    if args is None:
        sys.argv[1:] = argv
    try:
        if argv[:1] == [
            "cluster"
        ]:  # `clusterlab cluster FOLDER`: clusterlab.cluster (not a LightningCLI stage)
            from clusterlab.cluster.command import main as cluster

            return cluster(argv[1:])
        if argv[:1] in (["env"], ["--version"]):  # clusterlab.env: versions, devices, the faiss build
            from clusterlab.env import main as env

            return env(argv)
        ClusterLabCLI(args=None if args is None else argv)
    except UserError as error:
        if debug:
            raise
        report_user_error(error)
        raise SystemExit(1) from None
    except OSError as error:  # a full disk or quota, wherever the write was (logs, metrics, figures)
        if debug or disk_full(error) is None:
            raise
        report_user_error(OutputError(_disk_full(error)))
        raise SystemExit(1) from None


_current_run: list[Path] = []  # the run directory of this process's run, once decided


def _disk_full(error: OSError) -> str:
    """What a full disk stopped, and what the run folder still holds to continue from."""
    where = f" writing {error.filename}" if error.filename else ""
    if not _current_run:
        return f"{error.strerror}{where}; nothing of a run was written yet"
    run_dir = _current_run[-1]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        kept = (
            f"{run_dir} keeps {last}; free some space, then continue with: clusterlab fit --config "
            f"{run_dir / 'config.yaml'} --ckpt_path last"
        )
    else:  # a fit's folder without a checkpoint is removed on the way out (ClusterLabCLI.fit)
        kept = (
            f"{run_dir} held no checkpoint yet; free some space (or pass another --runs_dir) and start again"
        )
    return f"{error.strerror}{where}; {kept}"


def report_user_error(error: UserError) -> None:
    from clusterlab.distributed import rank

    where = f" (rank {rank()})" if rank() else ""
    sys.stderr.write(plain(f"clusterlab: error{where}: {error}\n"))
    sys.stderr.flush()


if __name__ == "__main__":
    main()
