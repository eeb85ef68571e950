"""`clusterlab`: the Lightning CLI, with a run directory per run and a clustering report.

    clusterlab fit --config experiments/cc_digits.yaml [--seed_everything 1] [--trainer.max_epochs 50]
    clusterlab fit --config experiments/cc_digits.yaml --ckpt_path last      # continue the latest run
    clusterlab test --config runs/cc_digits/<run>/config.yaml \
        --ckpt_path runs/cc_digits/<run>/checkpoints/last.ckpt
    clusterlab fit --config experiments/cc_cifar10.yaml --print_config
    clusterlab cluster FOLDER --out DIR   # group a folder of photos (clusterlab.cluster.command)
    clusterlab env [--json]        # versions, GPUs, bf16 / TF32, the faiss build (clusterlab.env)

Each fit writes into runs/<name>/<timestamp>-seed<S>/ (clusterlab.runs; which one, and its
config.yaml: clusterlab.run_folder): config.yaml (the resolved config, loadable by every
subcommand), checkpoints/last.ckpt (after every epoch), metrics.csv, wandb/ (offline unless you
are logged in) and, at the end, metrics.json (clusterlab.fit_report): the final ACC / NMI / ARI
of every head and of the selected one, next to k-means on the same images, with epochs, seed and
wall time. `validate`, `test` and `predict` of a run's checkpoint write into a directory of their
own inside that run, so they never touch the fit's files.

A user error (a missing data set, an unreadable checkpoint or image, a checkpoint of another
method, an unwritable output, a diverged run) is one line and exit code 1 (clusterlab.errors);
`--debug` (or CLUSTERLAB_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from clusterlab import errors, run_folder, runs
from clusterlab.callbacks.assignments import AssignmentWriter
from clusterlab.callbacks.figures import ClusterFigures
from clusterlab.callbacks.speed import Speed
from clusterlab.checkpointing import EpochRowFirst, timed_last_checkpoint
from clusterlab.config_checks import ClusterLabParser, check_config
from clusterlab.console import quiet_libraries
from clusterlab.data.datamodule import ClusterDataModule
from clusterlab.distributed import lengthen_default_timeout
from clusterlab.fit_report import write_report
from clusterlab.methods.base import ClusteringMethod


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
        parser.add_lightning_class_args(AssignmentWriter, "assignments")
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
        name = config.name or run_folder.config_name(config) or "run"
        portable = run_folder.portable_config(parser, self.config, name)
        decision = runs.agree(lambda: run_folder.decide_run(subcommand, config, name, portable))
        self.run_dir = Path(decision["run_dir"])
        run_folder.set_current(self.run_dir)
        self.checkpoint_meta = decision["checkpoint"]
        if "ckpt_path" in config:
            config.ckpt_path = decision["ckpt_path"]

    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        if (
            self.config.get("subcommand") == "predict"
            and config.data.dataset == "image_folder"
            and self.checkpoint_meta
        ):
            run_folder.folder_input_from_checkpoint(config.data, self.checkpoint_meta)
        run_folder.write_into(config, self.run_dir)

    def after_instantiate_classes(self) -> None:
        lengthen_default_timeout(self.trainer.strategy)  # before trainer.fit makes the process group
        minutes = self._subconfig().get("checkpoint_every_minutes")
        if minutes:  # a second writer of last.ckpt, inside epochs (Lightning's triggers exclude each other)
            self.trainer.callbacks.append(timed_last_checkpoint(self.run_dir / "checkpoints", minutes))

    def _instantiate_trainer(self, config, callbacks):
        if config.get("enable_progress_bar") is False:  # Lightning refuses a progress bar beside it
            callbacks = [c for c in callbacks if not isinstance(c, RichProgressBar)]
        return super()._instantiate_trainer(config, callbacks)

    # -- fit report -------------------------------------------------------------------------

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:  # a user error or a crash while building: the run never started
            run_folder.remove_unstarted_run(self.run_dir)
            # jsonargparse wraps what a class's constructor raised in a ValueError of its own, with
            # the whole config in its text: the user error it wraps is the one line to show.
            cause = errors.user_error_behind(error)
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
                rank_zero_info(run_folder.interrupted_note(self.run_dir))
            if self.trainer.received_sigterm:
                # Lightning's SIGTERMException exits with code 0; a scheduler or a script would
                # read that as a finished run. 128 + 15, as a process killed by SIGTERM.
                raise SystemExit(143) from None
            raise  # a stop before the first checkpoint keeps its directory: `--ckpt_path last` restarts it
        except Exception:
            # A user error or a crash: without a checkpoint there is nothing to continue, and an
            # empty run directory would only stand in the way of `--ckpt_path last`.
            run_folder.remove_unstarted_run(self.run_dir)
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

    def _write_report(self, stage: str, wall_time: float) -> None:
        write_report(
            stage,
            wall_time,
            config=self._subconfig(),
            model=self.model,
            data=self.datamodule,
            trainer=self.trainer,
            run_dir=self.run_dir,
            checkpoint_meta=self.checkpoint_meta,
        )


# -- the command ----------------------------------------------------------------------------------


# What `clusterlab --help` prints: Lightning's own top-level help knows neither what clusterlab is
# nor the commands that main() runs before the LightningCLI (`cluster`, `env`).
HELP = """\
usage: clusterlab COMMAND [options]     (clusterlab COMMAND --help: the options of one command)

clusterlab: deep image clustering (CC, NNM, SCL, DCCM) on PyTorch Lightning: one backbone, one
evaluation protocol, many seeds.

commands:
  fit        train a method on a data set; writes runs/<name>/<timestamp>-seed<S>/ (config.yaml,
             checkpoints/last.ckpt, metrics.csv, metrics.json)
  validate   evaluate a checkpoint on the validation split
  test       evaluate a checkpoint on the test split
  predict    put images (a data set, or a folder: --data.dataset image_folder) into a checkpoint's
             clusters; writes assignments.csv and contact sheets
  cluster    group a folder of photos: choose how many groups, train, write report.html
  env        what this install runs on: versions, GPUs, bf16 / TF32, the faiss build

options:
  -h, --help   show this message and exit
  --version    print clusterlab's version (with torch's and CUDA's) and exit
  --debug      show the traceback of a user error (also: CLUSTERLAB_DEBUG=1)
"""


def main(args: list[str] | None = None) -> None:
    """`clusterlab ...`: user errors are one line and exit code 1 (`--debug`: the traceback)."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get("CLUSTERLAB_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not debug:
        quiet_libraries()
    if args is None:
        sys.argv[1:] = argv
    if argv[:1] in (["-h"], ["--help"]):
        print(HELP, end="")
        return
    try:
        if argv[:1] == ["cluster"]:  # clusterlab.cluster.command: not a LightningCLI stage
            from clusterlab.cluster.command import main as cluster

            return cluster(argv[1:])
        if argv[:1] in (["env"], ["--version"]):  # clusterlab.env: versions, devices, the faiss build
            from clusterlab.env import main as env

            return env(argv)
        ClusterLabCLI(args=None if args is None else argv)
    except errors.UserError as error:
        if debug:
            raise
        errors.report_user_error(error)
        raise SystemExit(1) from None
    except OSError as error:  # a full disk or quota, wherever the write was (logs, metrics, figures)
        if debug or errors.disk_full(error) is None:
            raise
        errors.report_user_error(errors.OutputError(errors.disk_full_message(error, run_folder.current())))
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
