#!/usr/bin/env bash
# Download the wheels that bench/gpu_check.sh installs on the GPU machine (which has no network):
# TRL, Liger-Kernel and Cut Cross-Entropy, pure-Python wheels, for the device's Python 3.12, plus
# datasets and its two needs the GPU image lacks (dill, multiprocess): trl.trainer imports datasets.
#
#   bash bench/fetch_wheels.sh [DIR]        # DIR defaults to .whl (keep it out of git:
#                                           # echo /.whl/ >> .git/info/exclude, then carry ".whl")
#
# --no-deps: their other needs (torch, triton, transformers, pyarrow, pandas, xxhash...) are already on
# the GPU image (without datasets, the first H100 run lost every TRL contender and the TRL adapter tests).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19
ls -l "$DIR"
