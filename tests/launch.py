"""Launching real processes from tests: `clusterlab` under torchrun, Lightning's own launcher and
SLURM's environment, each with a timeout after which the whole process group is killed, so that
a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def tail(self, chars: int = 4000) -> str:
        out, err = self.stdout[-chars:], self.stderr[-chars:]
        return f"exit {self.returncode}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "COLUMNS": "200",
    }
    for key in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC_", "CLUSTERLAB_RUN"))]:
        del env[key]  # whatever launched the tests is not what the test launches
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK"):
        env.pop(key, None)
    return {**env, **extra}


def run(command: list[str], cwd, timeout: float, env: dict | None = None) -> Finished:
    """Run `command` in its own process group; on timeout, SIGKILL the group and fail."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env or environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"{' '.join(command)} did not end within {timeout} s (hung?)\n{stderr[-4000:]}"
        ) from None
    return Finished(process.returncode, stdout, stderr)


def clusterlab(*args: str, cwd, timeout: float = 300, env: dict | None = None) -> Finished:
    return run([sys.executable, "-m", "clusterlab", *args], cwd, timeout, env)


def torchrun(*args: str, cwd, processes: int = 2, timeout: float = 300) -> Finished:
    """`torchrun --nproc_per_node N -m clusterlab.cli ...`, as a cluster user types it."""
    command = [
        TORCHRUN,
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
        "-m",
        "clusterlab.cli",
    ]
    return run([*command, *args], cwd, timeout)


def srun(*args: str, cwd, processes: int = 2, timeout: float = 300, job_id: int = 4242) -> Finished:
    """What `srun --ntasks N python -m clusterlab ...` starts on one node: N processes, each with
    the environment SLURM gives a task (Lightning's SLURMEnvironment reads it)."""
    port = str(free_port())
    procs = []
    for rank in range(processes):
        env = environment(
            SLURM_NTASKS=str(processes),
            SLURM_NTASKS_PER_NODE=str(processes),
            SLURM_NNODES="1",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NODEID="0",
            SLURM_JOB_ID=str(job_id),
            SLURM_STEP_ID="0",
            SLURM_JOB_NAME="clusterlab-test",
            SLURM_NODELIST="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "clusterlab", *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    outputs, hung = [], False
    for process in procs:
        try:
            outputs.append(process.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            hung = True
            break
    if hung:
        for process in procs:
            os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"srun-style launch of {args} did not end within {timeout} s (hung?)")
    code = max((p.returncode for p in procs), key=abs)
    return Finished(code, "\n".join(o for o, _ in outputs), "\n".join(e for _, e in outputs))
