#!/usr/bin/env bash
# Fills benchmarks/device/carry/ (ignored by git) with what the GPU machine lacks, once:
#   make device-carry
# The GPU machine has Python 3.12 with torch, torchvision, pytorch-lightning and torchmetrics, and no
# network: clusterlab's other imports travel as wheels (kornia, faiss-cpu, jsonargparse and what they
# need that is not there) and Fashion-MNIST as Debian's package. About 40 MB in all.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
# The versions `make setup` installs (constraints.txt), so that the GPU runs what CI tested.
pin() { grep -i "^$1==" "$here/../../constraints.txt" || { echo "$1 is not in constraints.txt" >&2; exit 1; }; }
mkdir -p "$here/carry/wheels"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$here/carry/wheels" \
    "$(pin kornia)" "$(pin kornia_rs)" "$(pin faiss-cpu)" "$(pin jsonargparse)" "$(pin docstring_parser)" \
    "$(pin typeshed_client)" importlib_resources
(cd "$here/carry" && apt-get download dataset-fashion-mnist)
ls -l "$here/carry" "$here/carry/wheels"
