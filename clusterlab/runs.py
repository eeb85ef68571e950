"""Run directories: one per run, made atomically, the same for every process of a run.

    runs/<name>/<YYYYmmdd-HHMMSS>-seed<S>/        a fit: config.yaml, checkpoints/last.ckpt, metrics.csv,
                                                  metrics.json, figures/, wandb/
    runs/<name>/<fit run>/<stage>-<YYYYmmdd-HHMMSS>/
                                                  validate / test / predict of that run's checkpoint
    runs/<name>/<YYYYmmdd-HHMMSS>-<stage>-seed<S>/
                                                  validate / test / predict of a checkpoint from elsewhere

A directory is created with an exclusive `mkdir`; when the name is taken (two runs started in the
same second), the next free `-2`, `-3`, ... suffix is taken, so concurrent runs never share one.

The processes of one run agree on its directory: rank 0 decides (resolving `--ckpt_path last`,
creating the directory) and the others learn its decision from the launcher that started them
(`agree`): through the environment for the processes Lightning's own launcher starts
(`--trainer.devices N`), through the launcher's key-value store for torchrun, and through a store
that rank 0 serves at Lightning's SLURM address for `srun` (the process group that Lightning
creates later shares that server).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from clusterlab.errors import CheckpointError, OutputError, UserError

STAGES = ("validate", "test", "predict")
_FIT_RUN = re.compile(r"^(\d{8}-\d{6})-seed(-?\d+)(?:-(\d+))?$")
_DECISION_ENV = "CLUSTERLAB_RUN"  # rank 0's decision, for the processes Lightning's launcher starts
_STORES: list = []  # a store this process serves must outlive the exchange


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def make_run_dir(parent: Path, stem: str) -> Path:
    """Create parent/stem, or parent/stem-2, -3, ... when taken: exclusively, never shared."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"cannot create the run folder {parent}: {error.strerror}. Pass a writable --runs_dir."
        ) from None
    for n in range(1, 10_000):
        candidate = parent / (stem if n == 1 else f"{stem}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            raise OutputError(
                f"cannot create the run directory {candidate}: {error.strerror}. Pass a writable --runs_dir."
            ) from None
        if not os.access(candidate, os.W_OK):
            raise OutputError(f"the run directory {candidate} is not writable. Pass a writable --runs_dir.")
        return candidate
    raise OutputError(f"no free run directory name {stem}-N under {parent}")


def fit_runs(runs: Path, seed: int | None = None) -> list[Path]:
    """The fit run directories under runs/<name>/, oldest first (optionally of one seed only)."""
    if not runs.is_dir():
        return []
    found = []
    for path in runs.iterdir():
        match = _FIT_RUN.match(path.name)
        if match and path.is_dir() and (seed is None or int(match.group(2)) == seed):
            found.append(((match.group(1), int(match.group(3) or 1)), path))
    return [path for _, path in sorted(found)]


def run_of_checkpoint(ckpt_path: str | os.PathLike | None) -> Path | None:
    """The run directory a checkpoint was written into (<run>/checkpoints/x.ckpt), if it is one."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent
    return None


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """A checkpoint file, read weights-only: tensors, numbers, strings and containers, never a
    pickled object, whose unpickling could run code that a planted file names. Every checkpoint
    clusterlab reads goes through here or through `AtomicCheckpointIO.load_checkpoint`, which
    loads the same way. A file that cannot be read is named in a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 - every way a file can fail to be a checkpoint
        raise CheckpointError(
            f"cannot read checkpoint {path} ({path.stat().st_size} bytes): {load_failure(error)}. It is "
            "truncated, not a checkpoint, or holds pickled objects (clusterlab loads weights only); use "
            "another one (a run's checkpoints/last.ckpt)."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def load_failure(error: Exception) -> str:
    """Why torch.load refused a file, in a few words: for a weights-only refusal, the code the file
    names (torch's own message goes on to suggest `weights_only=False`, the one thing not to do)."""
    text = str(error)
    named = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text)
    if "Weights only load failed" in text:
        return (
            f"it names {named.group(1)}, code that loading would run" if named else "it holds pickled objects"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first


def read_checkpoint(path: str | os.PathLike, checkpoint: dict | None = None) -> dict:
    """What a checkpoint says about itself, without its weights: the "clusterlab" entry (method,
    clusters, input shape, epochs trained) plus Lightning's epoch and global step. `checkpoint`:
    the file's contents when the caller has loaded them already."""
    checkpoint = load_checkpoint(path, mmap=True) if checkpoint is None else checkpoint
    meta = dict(checkpoint.get("clusterlab") or {})
    meta.update(path=str(path), epoch=checkpoint.get("epoch"), global_step=checkpoint.get("global_step"))
    return meta


def describe_checkpoint(meta: dict) -> str:
    """ "CC (10 clusters, 1x8x8, 2 epochs)"."""
    details = []
    if meta.get("num_clusters") is not None:
        details.append(f"{meta['num_clusters']} clusters")
    if meta.get("input_shape"):
        details.append("x".join(map(str, meta["input_shape"])))
    if meta.get("epochs_trained") is not None:
        details.append(f"{meta['epochs_trained']} epochs")
    return (
        f"{meta.get('method', 'an unknown method')} ({', '.join(details)})"
        if details
        else meta.get("method", "?")
    )


# -- processes of one run agree --------------------------------------------------------------


@dataclass
class Launch:
    """How this process was started, as far as agreeing on a run directory goes."""

    # "single" (also Lightning's launcher, before it starts the others), "lightning", "torchrun", "slurm"
    kind: str
    rank: int = 0
    address: str | None = None
    port: int | None = None
    agent_store: bool = False  # torchrun's agent serves the store at address:port
    attempt: str = "0"


def detect_launch() -> Launch:
    from pytorch_lightning.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        attempt = (
            f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        )
        return Launch(
            "torchrun",
            int(os.environ["RANK"]),
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            agent_store=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
            attempt=attempt,
        )
    if SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        slurm = SLURMEnvironment()
        attempt = f"{os.environ.get('SLURM_JOB_ID', '')}.{os.environ.get('SLURM_STEP_ID', '')}"
        return Launch("slurm", slurm.global_rank(), slurm.main_address, slurm.main_port, attempt=attempt)
    if os.environ.get(_DECISION_ENV) and os.environ.get("LOCAL_RANK", "0") != "0":
        return Launch("lightning", int(os.environ["LOCAL_RANK"]))
    return Launch("single")


def agree(decide: Callable[[], dict], launch: Launch | None = None) -> dict:
    """Rank 0's `decide()` on every process of the run: rank 0 calls it, the others receive its
    result (or its UserError) through the launcher. `decide` returns JSON-able data."""
    launch = launch or detect_launch()
    if launch.kind == "lightning":
        payload = json.loads(os.environ[_DECISION_ENV])
    elif launch.kind == "single":
        payload = _decide(decide)
        # The processes Lightning's launcher starts for `--trainer.devices N` inherit this.
        os.environ[_DECISION_ENV] = json.dumps(payload)
    else:
        store, key = _store(launch), f"clusterlab/run/{launch.attempt}"
        if launch.rank == 0:
            payload = _decide(decide)
            store.set(key, json.dumps(payload))
        else:
            payload = json.loads(store.get(key))
    if "error" in payload:
        raise UserError(payload["error"])
    return payload["decision"]


def _decide(decide: Callable[[], dict]) -> dict:
    try:
        return {"decision": decide()}
    except UserError as error:
        return {"error": str(error)}


def _store(launch: Launch):
    from torch.distributed import TCPStore

    timeout = timedelta(seconds=float(os.environ.get("CLUSTERLAB_LAUNCH_TIMEOUT", 600)))
    if launch.agent_store:  # torchrun's agent serves it
        return TCPStore(launch.address, launch.port, is_master=False, timeout=timeout)
    # Rank 0 serves it where the process group will rendezvous; multi-tenant, so that the
    # process group's own store in this process shares the server instead of failing to bind.
    store = TCPStore(
        launch.address, launch.port, is_master=launch.rank == 0, timeout=timeout, multi_tenant=True
    )
    _STORES.append(store)
    return store
