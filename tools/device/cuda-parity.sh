#!/usr/bin/env bash
# The diffusers parity tests and the pipeline behaviour tests on ONNX Runtime's CUDA execution
# provider, on the GPU machine, plus the demo on CPU and GPU.
#
# Here: bash ../shared/gpu/pack-onnxruntime-cuda.sh   (pieces in .gpu-carry/ort/)
#       cargo test --release --no-run; mkdir -p .gpu-carry/katz
#       strip -o .gpu-carry/katz/katz target/release/katz
#       strip -o .gpu-carry/katz/parity target/release/deps/parity-<hash>
#       strip -o .gpu-carry/katz/pipeline target/release/deps/pipeline-<hash>
# There: one call per piece (carry .gpu-carry/ort/ort.tar.xz.part.NN): cp .gpu-carry/ort/* /opt/ortp/
#        then (carry the last piece and .gpu-carry/katz): bash tools/device/cuda-parity.sh
set -euo pipefail
mkdir -p /opt/ortp /opt/ort
cp .gpu-carry/ort/ort.tar.xz.part.* /opt/ortp/ 2>/dev/null || true
[[ -f /opt/ort/libonnxruntime.so.1.31.1 ]] || cat /opt/ortp/ort.tar.xz.part.* | xz -dc | tar -x -C /opt/ort
NV=$(python3 -c "import nvidia;print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=/opt/ort:$(ls -d "$NV"/*/lib | paste -sd:):/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ORT_DYLIB_PATH=/opt/ort/libonnxruntime.so.1.31.1 KATZ_REPO=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
KATZ_TEST_DEVICE=cuda:0 .gpu-carry/katz/parity --test-threads 1 --nocapture 2>&1 | grep -E "relative|test result"
KATZ_TEST_DEVICE=cuda:0 .gpu-carry/katz/pipeline 2>&1 | grep -E "test result"
for d in cpu cuda:0; do .gpu-carry/katz/katz demo --device "$d" --output "${OUT:-/tmp}/demo-${d/:/}.png"; done
