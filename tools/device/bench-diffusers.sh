#!/usr/bin/env bash
# The diffusers baseline (tools/bench_diffusers.py) on the GPU machine, whose python3 has torch,
# transformers and peft; diffusers travels as a wheel.
# Here: pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu-carry/w diffusers==0.42.1 importlib_metadata
# There (carry .gpu-carry/w): bash tools/device/bench-diffusers.sh [bench_diffusers.py args]
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu-carry/w/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
machine=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
python3 tools/bench_diffusers.py --out "${OUT:-docs/bench}/diffusers-$machine.json" "$@"
