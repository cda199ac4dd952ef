#!/usr/bin/env bash
# GPU tests on the GPU machine: the CUDA kernels against the CPU kernels (katz-kernels' ignored
# tests). Here: cargo test --release -p katz-kernels --no-run; strip the printed test binary into
# .gpu-carry/kt/kernels. There (carry .gpu-carry/kt): bash tools/device/gpu-tests.sh
set -euo pipefail
NV=$(python3 -c "import nvidia;print(list(nvidia.__path__)[0])" 2>/dev/null || true)
[[ -n $NV ]] && export LD_LIBRARY_PATH=$(ls -d "$NV"/*/lib | paste -sd:):/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
.gpu-carry/kt/kernels --include-ignored --test-threads 1
