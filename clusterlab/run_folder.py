"""Which run directory a `clusterlab fit / validate / test / predict` writes into, decided on rank 0.

`decide_run` resolves `--ckpt_path last`, checks the checkpoint against the config
(`check_checkpoint_fits`), makes the run directory (clusterlab.runs) and writes its config.yaml:
the config as `portable_config` dumps it, which every subcommand loads. A fit that fails before its
first checkpoint leaves nothing to continue: `remove_unstarted_run` removes the directory it made.

A program that starts `clusterlab fit` and needs to know where the run wrote (two runs of one
config and seed started in the same second get suffixed names) sets CLUSTERLAB_RUN_DIR_FILE to a
file path: the run writes its directory's path there, one line, as soon as the directory is made.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import yaml
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from clusterlab import runs
from clusterlab.config_checks import check_checkpoint_model
from clusterlab.errors import CheckpointError, OutputError, UserError

RUN_DIR_FILE_ENV = "CLUSTERLAB_RUN_DIR_FILE"

# Keys that belong to one subcommand only: a saved config leaves them out, so that it loads in all.
_STAGE_KEYS = ("ckpt_path", "verbose", "return_predictions")

# The fit run directories this process made, to start a run in: the only ones a failed start may
# remove (`remove_unstarted_run`). Rank 0 alone makes them (clusterlab.runs.agree), so the other
# ranks never remove anything; a run directory continued or started again is never in here.
_MADE_HERE: set[str] = set()

# What a fit writes into its run directory before its first checkpoint: its config, and the
# loggers' files (hparams.yaml, metrics.csv, wandb/). Anything else (a checkpoint, the
# unreadable.csv that an error names, a file put there by someone else) keeps the directory.
_STARTUP_FILES = ("config.yaml", "hparams.yaml", "metrics.csv", "metrics.csv.tmp")

_CURRENT: list[Path] = []  # the run directory of this process's run, once decided


def set_current(run_dir: Path) -> None:
    """Record the run directory this process's run writes into (`current`)."""
    _CURRENT.append(run_dir)


def current() -> Path | None:
    """The run directory of this process's run, or None before it is decided: what an error names."""
    return _CURRENT[-1] if _CURRENT else None


def remove_unstarted_run(run_dir: Path) -> None:
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


def decide_run(subcommand: str, config, name: str, portable: str) -> dict:
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
    _tell_run_dir(run_dir)
    return {"run_dir": str(run_dir), "ckpt_path": ckpt_path, "checkpoint": meta}


def _tell_run_dir(run_dir: Path) -> None:
    """Write the run directory's path into the file CLUSTERLAB_RUN_DIR_FILE names, if it names one:
    how a program that started the run finds it, without reading what the run prints."""
    target = os.environ.get(RUN_DIR_FILE_ENV)
    if not target:
        return
    try:
        Path(target).write_text(f"{run_dir}\n")
    except OSError as error:
        raise OutputError(
            f"cannot write the run directory's path to {target} ({RUN_DIR_FILE_ENV}): {error.strerror}"
        ) from None


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


def portable_config(parser, config, name: str) -> str:
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


def folder_input_from_checkpoint(data, meta: dict) -> None:
    """Decode a folder to the size and channels the checkpoint's model was trained on, and take its
    number of clusters (an unlabeled folder has no classes to count), unless given."""
    data.num_clusters = data.num_clusters or meta.get("num_clusters")
    shape = meta.get("input_shape")
    if shape:
        data.channels = data.channels or shape[0]
        data.image_size = data.image_size or shape[-1]


def config_name(config) -> str | None:
    """The stem of the last config file given (`--config x/cc_digits.yaml`: cc_digits), the default
    run name."""
    paths = config.get("config") or []
    return Path(str(paths[-1])).stem if paths else None


def write_into(config, run_dir: Path) -> None:
    """Point the trainer, the checkpoint callback and every logger of the (sub)config at `run_dir`,
    before they are built: all a run writes lands in its own directory."""
    config.trainer.default_root_dir = str(run_dir)
    config.checkpoint.dirpath = str(run_dir / "checkpoints")
    loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
    for logger in loggers:
        args = getattr(logger, "init_args", None)
        if args is not None and "save_dir" in args:
            args.save_dir = str(run_dir)
        if args is not None and "name" in args and not args.name:
            args.name = f"{run_dir.parent.name}/{run_dir.name}"


def interrupted_note(run_dir: Path) -> str:
    """What a fit stopped by Ctrl-C or SIGTERM keeps, and how to continue it."""
    last = run_dir / "checkpoints" / "last.ckpt"
    kept = f"{last} (written at the end of the last whole epoch)" if last.exists() else "no checkpoint yet"
    return (
        f"Interrupted. The run keeps {kept}; continue it with: clusterlab fit --config "
        f"{run_dir / 'config.yaml'} --ckpt_path last"
    )
