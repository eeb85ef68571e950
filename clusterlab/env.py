"""`clusterlab env` and `clusterlab --version`: what this install runs on.

    clusterlab env          # versions, GPUs, cuDNN, bf16, TF32, the faiss build, cores and threads
    clusterlab env --json   # the same rows as one JSON object, for scripts
    clusterlab --version    # clusterlab 0.1.0 (torch 2.5.1+cu124, CUDA 12.4)

`collect()` returns the rows, in order, with plain values (str, int, bool, list, None: "does not apply
here"), so that the JSON keeps their types; `format_rows()` aligns them for a terminal. The faiss rows
say which build the `faiss` package on disk is, and what is wrong with it when the wheels that share
its files (faiss-cpu, faiss-gpu) were installed or removed in an order that breaks it
(docs/multi-gpu.md, "GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

from clusterlab import __version__

# Packages reported by their installed version, without importing them.
PACKAGES = ("torchvision", "pytorch-lightning", "torchmetrics", "kornia", "jsonargparse", "numpy")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
GPU_FIX = (
    "pip install --no-deps --force-reinstall faiss-gpu=={version} (docs/multi-gpu.md, "
    '"Installing faiss for the GPU")'
)


def collect() -> dict[str, Any]:
    """The rows `clusterlab env` prints, in order."""
    import torch

    rows: dict[str, Any] = {
        "clusterlab": __version__,
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda,
        "CUDA available": torch.cuda.is_available(),
        "CUDA devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    for i in range(rows["CUDA devices"]):
        props = torch.cuda.get_device_properties(i)
        rows[f"GPU {i}"] = (
            f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
            f"compute capability {props.major}.{props.minor}"
        )
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    cpu_model, cpu_flags = cpu_info()
    rows.update(
        {
            "cuDNN": cudnn_version(cudnn) if cudnn else None,
            "bf16 on GPU": _gpu_bf16() if torch.cuda.is_available() else None,
            "bf16 CPU flags": None if cpu_flags is None else [f for f in BF16_CPU_FLAGS if f in cpu_flags],
            "float32 matmul precision": torch.get_float32_matmul_precision(),
            "TF32 matmul": torch.get_float32_matmul_precision() != "highest",
        }
    )
    rows.update(faiss_rows())
    rows.update({name: installed_version(name) for name in PACKAGES})
    rows.update(
        {
            "CPU": cpu_model or platform.processor() or platform.machine(),
            "CPU cores": os.cpu_count(),
            "CPU cores usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        }
    )
    return rows


def faiss_rows() -> dict[str, Any]:
    """The faiss version, its build (CPU, GPU, or what is wrong), the GPUs it sees, the wheels that
    ship the `faiss` package, and a note with the fix when they do not fit together. No torch."""
    wheels = faiss_wheels()
    rows: dict[str, Any] = {"faiss": None, "faiss build": None, "faiss GPUs": 0, "faiss GPU support": False}
    try:
        import faiss
    except Exception as error:  # noqa: BLE001 - a broken install is what this row reports
        rows["faiss build"] = f"not importable: {type(error).__name__}: {error}"
    else:
        if getattr(faiss, "__file__", None) is None:  # faiss/ without its __init__.py: a namespace package
            rows["faiss build"] = "broken: faiss/ lacks its files (a wheel sharing them was uninstalled)"
        else:
            rows["faiss"] = getattr(faiss, "__version__", None)
            rows["faiss build"] = "GPU" if hasattr(faiss, "StandardGpuResources") else "CPU"
            rows["faiss GPUs"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
            rows["faiss GPU support"] = rows["faiss GPUs"] > 0
    rows["faiss wheels"] = [f"{name} {version}" for name, version in wheels.items()]
    note = _faiss_note(rows["faiss build"], wheels)
    if note:
        rows["faiss note"] = note
    return rows


def faiss_wheels() -> dict[str, str]:
    """The installed distributions named faiss*, which all write into the `faiss` package folder."""
    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("faiss"):
            found.setdefault(name, dist.version)
    return dict(sorted(found.items()))


def _faiss_note(build: str | None, wheels: dict[str, str]) -> str | None:
    """What to do when the faiss wheels do not fit together; None when they do."""
    gpu, others = wheels.get("faiss-gpu"), sorted(set(wheels) - {"faiss-cpu", "faiss-gpu"})
    broken = build not in ("CPU", "GPU")
    if others and (broken or len(wheels) > 1):  # e.g. faiss-gpu-cu12: another layout of the same folder
        return (
            f"{', '.join(others)} writes the faiss folder that clusterlab's faiss-cpu / faiss-gpu write: "
            f"pip uninstall -y {' '.join(others)}, then the commands of docs/multi-gpu.md, "
            '"Installing faiss for the GPU"'
        )
    if broken:
        fix = f"pip install -e '.[gpu]', then {GPU_FIX}" if gpu else "pip install --force-reinstall faiss-cpu"
        return f"repair: {fix.format(version=gpu)}"
    if build == "CPU" and gpu:
        return "faiss-gpu is installed, but faiss-cpu's files were written last: " + GPU_FIX.format(
            version=gpu
        )
    return None


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str | None, set[str] | None]:
    """The CPU's model name and its flags, from /proc/cpuinfo (None, None where there is none)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None, None
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86, arm
            flags = set(value.split())
    return model, flags


def native_bf16(device: str = "cpu") -> bool:
    """Whether `device` ("cpu" or "cuda") computes in bfloat16 in hardware: a CPU with AVX512-BF16 or
    AMX (elsewhere torch emulates it, slower than float32), a GPU from Ampere on."""
    if device == "cuda":
        return _gpu_bf16()
    _, flags = cpu_info()
    return bool(flags and any(flag in flags for flag in BF16_CPU_FLAGS))


def cudnn_version(number: int) -> str:
    """torch's cuDNN number as a version: 90100 is 9.1.0 (cuDNN 9), 8902 is 8.9.2 (cuDNN 8)."""
    if number >= 90000:
        return f"{number // 10000}.{number % 10000 // 100}.{number % 100}"
    return f"{number // 1000}.{number % 1000 // 100}.{number % 100}"


def _gpu_bf16() -> bool:
    """bf16 in hardware (Ampere on), not the emulation that torch also counts by default."""
    import torch

    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no emulation to leave out
        return torch.cuda.is_bf16_supported()


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def format_rows(rows: dict[str, Any]) -> str:
    width = max(len(key) for key in rows)
    return "\n".join(f"{key:<{width}}  {_show(value)}" for key, value in rows.items())


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def version_line() -> str:
    import torch

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "cpu"
    return f"clusterlab {__version__} (torch {torch.__version__}, {cuda})"


def main(argv: list[str]) -> None:
    """`clusterlab --version` or `clusterlab env [--json]` (argv as given to `clusterlab`)."""
    if argv[:1] == ["--version"]:
        print(version_line())
        return
    parser = argparse.ArgumentParser(
        prog="clusterlab env", description="What this install runs on: versions, devices, faiss build."
    )
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    args = parser.parse_args(argv[1:])
    rows = collect()
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
