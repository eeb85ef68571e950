#!/usr/bin/env bash
# The device call: on the GPU machine, from the repository root, with benchmarks/device/carry carried
# (filled here by `make device-carry`). Installs the carried wheels beside the machine's own packages,
# unpacks Fashion-MNIST, and runs every part of measure.py into $OUT (device.json, device.md).
#   run(command="bash benchmarks/device/run.sh", carry=["benchmarks/device/carry"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
carry=benchmarks/device/carry
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$carry"/wheels/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
dpkg -x "$carry"/dataset-fashion-mnist_*.deb /tmp/fashion
out="${OUT:-/tmp/device-out}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 python3 benchmarks/device/measure.py --out "$out" \
    --data_root /tmp/fashion/usr/share/datasets/fashion-mnist "$@"
