"""Loggers that write into the run directory: CSV (always) and W&B (offline unless logged in).

`save_dir` defaults to None, which the CLI replaces with the run directory.
"""

from __future__ import annotations

import csv
import netrc
import os
from urllib.parse import urlparse

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger as _CSVLogger
from pytorch_lightning.loggers import WandbLogger as _WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter


class _RowWriter(ExperimentWriter):
    """Lightning's CSV writer, made safe against a kill at any moment: metrics.csv is never deleted
    or half rewritten. It starts as the rows kept from an earlier part of the run (replacing the old
    file in one rename), rows are appended as they are flushed, and a new column rewrites the file
    into a temporary one that replaces it in one rename."""

    def __init__(self, log_dir: str, kept: list[dict]) -> None:
        super().__init__(log_dir)
        self.metrics_keys = sorted(set().union(*kept)) if kept else []
        if kept:
            self._replace(kept)
        elif os.path.isfile(self.metrics_file_path):  # nothing to keep: a fresh log
            os.remove(self.metrics_file_path)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes the earlier metrics.csv here
        pass

    def _replace(self, rows: list[dict]) -> None:
        temporary = self.metrics_file_path + ".tmp"
        with open(temporary, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.metrics_file_path)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        self._replace(rows)


class CSVLogger(_CSVLogger):
    """Lightning's CSV logger, writing metrics.csv and hparams.yaml into the run directory itself.

    Rows go to the file as they are logged, so a kill loses none, and the file is never missing
    or half written (`_RowWriter`). A resumed run keeps the rows its earlier part logged before
    the checkpoint it resumes from (`continue_from`, called by the CLI before anything is logged)
    and logs the rest again: every step is in the file once. Without a checkpoint to continue
    from, an existing metrics.csv is replaced.
    """

    def __init__(self, save_dir: str | None = None, flush_logs_every_n_steps: int = 1) -> None:
        super().__init__(
            save_dir or ".", name="", version="", flush_logs_every_n_steps=flush_logs_every_n_steps
        )
        self._earlier_rows: list[dict] = []
        earlier = os.path.join(self.log_dir, "metrics.csv")
        if os.path.isfile(earlier):
            with open(earlier, newline="") as f:
                self._earlier_rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        self._kept: list[dict] = []

    def continue_from(self, checkpoint: dict) -> None:
        """Keep the earlier rows logged before `checkpoint` (clusterlab.runs.read_checkpoint) was
        written: those of its completed epochs, and of its own epoch up to its step."""
        completed, epoch, step = (
            checkpoint.get("epochs_trained"),
            checkpoint.get("epoch"),
            checkpoint.get("global_step"),
        )
        if completed is None or step is None:
            return

        def before(row: dict) -> bool:
            row_epoch, row_step = float(row.get("epoch", "inf")), float(row.get("step", "inf"))
            return row_epoch < completed or (row_epoch == epoch and row_step < step)

        self._kept = [row for row in self._earlier_rows if before(row)]
        if self._experiment is not None:  # already made: start its file again from the kept rows
            self._experiment = _RowWriter(self.log_dir, self._kept)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.log_dir, exist_ok=True)
            self._experiment = _RowWriter(self.log_dir, self._kept)
        return self._experiment


def wandb_logged_in() -> bool:
    """True when W&B has credentials (WANDB_API_KEY, or a netrc entry for its host); never prompts."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_WandbLogger):
    """W&B logging that needs no network and never prompts.

    Args:
        project: W&B project.
        name: run name (default: the run directory's name).
        save_dir: where W&B writes its files (default: the run directory).
        offline: None (default): online if you are logged in, offline otherwise (sync later with
            `wandb sync <run dir>/wandb/offline-run-*`). WANDB_MODE, when set, wins.
        entity, group, tags: passed to wandb.init.
        log_model: upload checkpoints as artifacts (online only).
    """

    def __init__(
        self,
        project: str = "clusterlab",
        name: str | None = None,
        save_dir: str | None = None,
        offline: bool | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        log_model: bool = False,
    ) -> None:
        mode = os.environ.get("WANDB_MODE")
        if offline is None:
            offline = mode in ("offline", "dryrun") or (mode is None and not wandb_logged_in())
        super().__init__(
            project=project,
            name=name,
            save_dir=save_dir,
            offline=offline,
            entity=entity,
            group=group,
            tags=tags,
            log_model=log_model and not offline,
            dir=save_dir,
            settings=_quiet_settings(),
        )
        # Lightning passes `anonymous=None` on to wandb.init, which warns on every run that the
        # setting has no effect: it is not ours to pass.
        self._wandb_init.pop("anonymous", None)


def _quiet_settings():
    import wandb

    # No console capture (Lightning's rich output stays intact) and no git/system probing.
    return wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True)


def logs_this_step(trainer) -> bool:
    """Whether Lightning sends the logged values to the loggers at the end of the coming training
    batch (every `log_every_n_steps` optimizer steps, and when the run is stopping), from the
    trainer's public state: the step it reads them at is the one its optimizer step counter reaches
    next (one optimizer, as every method here has)."""
    return (trainer.global_step + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop
