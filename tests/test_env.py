"""`clusterlab env` and `clusterlab --version`: every row is there and says what torch and faiss say in
the process that asks; a faiss that the wheels sharing its folder broke is reported, not raised."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import types
from importlib import metadata

import faiss
import jsonargparse
import kornia
import pytest
import pytorch_lightning
import torch
import torchmetrics

import clusterlab
from clusterlab import env
from clusterlab.cli import main
from tests.launch import clusterlab as run_clusterlab

ROWS = (
    "clusterlab",
    "python",
    "executable",
    "platform",
    "torch",
    "torch CUDA build",
    "CUDA available",
    "CUDA devices",
    "cuDNN",
    "bf16 on GPU",
    "bf16 CPU flags",
    "float32 matmul precision",
    "TF32 matmul",
    "faiss",
    "faiss build",
    "faiss GPUs",
    "faiss GPU support",
    "faiss wheels",
    "torchvision",
    "pytorch-lightning",
    "torchmetrics",
    "kornia",
    "jsonargparse",
    "numpy",
    "CPU",
    "CPU cores",
    "CPU cores usable",
    "torch threads",
    "OMP_NUM_THREADS",
)


def env_output(capsys, *args: str) -> str:
    main(["env", *args])  # as `clusterlab env ...` dispatches it
    return capsys.readouterr().out


def cpuinfo_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.split(":")[0].strip() in ("flags", "Features")]
    except OSError:
        return None
    return set(lines[0].split(":", 1)[1].split()) if lines else set()


def assert_rows_match_this_process(rows: dict, own_process: bool = True) -> None:
    """`own_process`: the rows come from this process, whose settings (matmul precision, threads,
    environment) they must show; otherwise from a fresh one, with the same installation."""
    assert [key for key in ROWS if key not in rows] == []
    assert rows["clusterlab"] == clusterlab.__version__
    assert rows["python"] == platform.python_version()
    assert rows["torch"] == torch.__version__
    assert rows["torch CUDA build"] == torch.version.cuda
    assert rows["CUDA available"] is torch.cuda.is_available()
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert rows["CUDA devices"] == devices
    assert [key for key in rows if key.startswith("GPU ")] == [f"GPU {i}" for i in range(devices)]
    for i in range(devices):
        assert rows[f"GPU {i}"].startswith(torch.cuda.get_device_name(i) + ", ")
        assert re.search(r", \d+\.\d GiB, compute capability \d+\.\d+$", rows[f"GPU {i}"])
    if torch.backends.cudnn.is_available():
        number = torch.backends.cudnn.version()
        assert rows["cuDNN"] == env.cudnn_version(number)
        assert rows["cuDNN"].split(".")[0] == str(number // 10000 if number >= 90000 else number // 1000)
    else:
        assert rows["cuDNN"] is None
    if torch.cuda.is_available():
        assert isinstance(rows["bf16 on GPU"], bool)
        assert rows["bf16 on GPU"] <= torch.cuda.is_bf16_supported()  # hardware bf16 is bf16
    else:
        assert rows["bf16 on GPU"] is None
    flags = cpuinfo_flags()
    expected = None if flags is None else [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    assert rows["bf16 CPU flags"] == expected
    precision = torch.get_float32_matmul_precision() if own_process else rows["float32 matmul precision"]
    assert rows["float32 matmul precision"] == precision in ("highest", "high", "medium")
    assert rows["TF32 matmul"] is (precision != "highest")

    assert rows["faiss"] == faiss.__version__
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    assert rows["faiss GPUs"] == gpus
    assert rows["faiss GPU support"] is (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0)
    assert rows["faiss build"] == ("GPU" if hasattr(faiss, "StandardGpuResources") else "CPU")
    for wheel in ("faiss-cpu", "faiss-gpu"):
        try:
            version = metadata.version(wheel)
        except metadata.PackageNotFoundError:
            assert not any(w.startswith(wheel + " ") for w in rows["faiss wheels"])
        else:
            assert f"{wheel} {version}" in rows["faiss wheels"]

    for module, name in (
        (kornia, "kornia"),
        (pytorch_lightning, "pytorch-lightning"),
        (torchmetrics, "torchmetrics"),
        (jsonargparse, "jsonargparse"),
    ):
        assert rows[name] == module.__version__ == metadata.version(name)
    assert rows["CPU cores"] == os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        assert rows["CPU cores usable"] == len(os.sched_getaffinity(0))
    if own_process:
        assert rows["executable"] == sys.executable
        assert rows["torch threads"] == torch.get_num_threads()
        assert rows["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS")


def test_env_json_says_what_torch_and_faiss_say(capsys):
    rows = json.loads(env_output(capsys, "--json"))
    assert_rows_match_this_process(rows)


def test_env_prints_every_row_aligned(capsys):
    lines = env_output(capsys).splitlines()
    rows = env.collect()
    assert len(lines) == len(rows)
    width = max(map(len, rows))
    for line, (key, value) in zip(lines, rows.items()):
        assert line[:width].rstrip() == key and line[width : width + 2] == "  ", line
        shown = line[width + 2 :]
        if isinstance(value, bool):
            assert shown == ("yes" if value else "no")
        elif value is None:
            assert shown == "-"
        elif not isinstance(value, list):
            assert shown == str(value)
    assert f"torch{' ' * (width - 3)}{torch.__version__}" in lines


def test_version_is_one_line_with_torch_and_its_cuda(capsys):
    main(["--version"])
    out = capsys.readouterr().out
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "cpu"
    assert out == f"clusterlab {clusterlab.__version__} (torch {torch.__version__}, {cuda})\n"


def test_env_command_in_its_own_process(tmp_path):
    """What a device script runs: `python -m clusterlab env --json`, with one thread (OMP_NUM_THREADS=1)."""
    done = run_clusterlab("env", "--json", cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.tail()
    rows = json.loads(done.stdout)
    assert_rows_match_this_process(rows, own_process=False)
    assert rows["OMP_NUM_THREADS"] == "1" and rows["torch threads"] == 1


def test_env_reads_the_matmul_precision_when_asked():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        rows = env.collect()
        assert rows["float32 matmul precision"] == "high" and rows["TF32 matmul"] is True
        torch.set_float32_matmul_precision("highest")
        rows = env.collect()
        assert rows["float32 matmul precision"] == "highest" and rows["TF32 matmul"] is False
    finally:
        torch.set_float32_matmul_precision(before)


def test_bf16_cpu_flags_come_from_cpuinfo(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n"
    )
    assert env.cpu_info(str(cpuinfo)) == ("Test CPU 9000", {"fpu", "sse2", "avx512f", "amx_bf16", "amx_tile"})
    assert env.cpu_info(str(tmp_path / "missing")) == (None, None)

    monkeypatch.setattr(env, "cpu_info", lambda: ("Test CPU 9000", {"amx_bf16", "avx512f"}))
    rows = env.collect()
    assert rows["bf16 CPU flags"] == ["amx_bf16"] and rows["CPU"] == "Test CPU 9000"
    monkeypatch.setattr(env, "cpu_info", lambda: (None, None))  # no /proc/cpuinfo (macOS)
    rows = env.collect()
    assert rows["bf16 CPU flags"] is None and rows["CPU"]


@pytest.mark.parametrize(("number", "version"), [(92400, "9.24.0"), (90100, "9.1.0"), (8902, "8.9.2")])
def test_cudnn_version(number, version):
    assert env.cudnn_version(number) == version


def fake_faiss(gpu_build: bool, gpus: int) -> types.ModuleType:
    module = types.ModuleType("faiss")
    module.__file__, module.__version__ = "/site-packages/faiss/__init__.py", "1.15.1"
    module.get_num_gpus = lambda: gpus
    if gpu_build:
        module.StandardGpuResources = object
    return module


CPU_AND_GPU = {"faiss-cpu": "1.15.1", "faiss-gpu": "1.15.1"}


@pytest.mark.parametrize(
    ("module", "wheels", "build", "note"),
    [
        (fake_faiss(True, 2), CPU_AND_GPU, "GPU", None),  # the documented GPU install
        (fake_faiss(True, 0), CPU_AND_GPU, "GPU", None),  # ... on a machine without a GPU
        (fake_faiss(False, 0), {"faiss-cpu": "1.15.1"}, "CPU", None),
        (fake_faiss(False, 0), CPU_AND_GPU, "CPU", "--no-deps --force-reinstall faiss-gpu==1.15.1"),
        # `pip uninstall faiss-cpu` after the GPU wheel: faiss/ is left without __init__.py, and
        # `import faiss` gives an empty namespace package
        (types.ModuleType("faiss"), {"faiss-gpu": "1.15.1"}, "broken", "pip install -e '.[gpu]', then"),
        (None, {"faiss-cpu": "1.15.1"}, "not importable: ModuleNotFoundError", "--force-reinstall faiss-cpu"),
        (
            None,
            {"faiss-cpu": "1.15.1", "faiss-gpu-cu12": "1.14.1"},
            "not importable",
            "uninstall -y faiss-gpu-cu12",
        ),
        (fake_faiss(True, 1), {"faiss-gpu-cu12": "1.14.1"}, "GPU", None),  # alone, it is a whole faiss
    ],
)
def test_faiss_rows(monkeypatch, module, wheels, build, note):
    monkeypatch.setitem(sys.modules, "faiss", module)  # None: `import faiss` raises ImportError
    monkeypatch.setattr(env, "faiss_wheels", lambda: wheels)
    rows = env.faiss_rows()
    assert rows["faiss build"].startswith(build)
    whole = build in ("CPU", "GPU")
    assert rows["faiss"] == ("1.15.1" if whole else None)
    assert rows["faiss GPUs"] == (module.get_num_gpus() if whole else 0)
    assert rows["faiss GPU support"] is (whole and module.get_num_gpus() > 0)
    assert rows["faiss wheels"] == [f"{name} {version}" for name, version in wheels.items()]
    assert (note is None) == ("faiss note" not in rows)
    if note:
        assert note in rows["faiss note"]


def test_env_with_a_broken_faiss_still_prints(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)
    rows = json.loads(env_output(capsys, "--json"))
    assert rows["faiss build"].startswith("not importable") and rows["faiss GPU support"] is False
    assert rows["torch"] == torch.__version__


def test_every_metrics_json_records_the_library_versions_and_the_source_commit(tmp_path):
    """What a seed's figures depend on besides torch: kornia draws the views, faiss and scikit-learn
    compute neighbours and k-means (a kornia release changed the host reads of a step)."""
    import subprocess

    from clusterlab.fit_report import environment, source_revision

    recorded = environment()
    assert recorded["packages"]["kornia"] == kornia.__version__
    assert recorded["packages"]["pytorch-lightning"] == pytorch_lightning.__version__
    assert recorded["faiss"] == env.faiss_wheels() and recorded["faiss"]
    repo = os.path.dirname(os.path.dirname(clusterlab.__file__))
    if not os.path.exists(os.path.join(repo, ".git")):
        assert recorded["clusterlab_source"] is None
        return
    head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert recorded["clusterlab_source"].split()[0] == head.strip()
    clean = not subprocess.run(
        ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    assert recorded["clusterlab_source"].endswith("+uncommitted changes") != clean
    assert source_revision() == recorded["clusterlab_source"]
