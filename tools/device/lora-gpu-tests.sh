#!/usr/bin/env bash
# The LoRA path on the GPU machine: pristine weights on the device, merges on the device (one
# launch), async switch at the bound — the LoRA, embedded and pipeline tests on ONNX Runtime's
# CUDA execution provider, and the demo on cuda:0.
#
# Here: bash ../shared/gpu/pack-onnxruntime-cuda.sh    (pieces in .gpu-carry/ort/)
#       cargo test --release --no-run; strip the lora, embedded and pipeline test binaries and
#       target/release/katz into .gpu-carry/katz/
# There: one call per ORT piece (carry it, plus at most one binary per call so a call stays under
#        the carry limit), each copying what it carries: bash tools/device/lora-gpu-tests.sh stage
#        then: bash tools/device/lora-gpu-tests.sh run
set -euo pipefail
mkdir -p /opt/ortp /opt/ort /opt/kb
cp .gpu-carry/ort/ort.tar.xz.part.* /opt/ortp/ 2>/dev/null || true
cp .gpu-carry/katz/* /opt/kb/ 2>/dev/null || true
ls /opt/ortp /opt/kb
[[ ${1:-run} == stage ]] && exit 0
[[ -f /opt/ort/libonnxruntime.so.1.31.1 ]] || cat /opt/ortp/ort.tar.xz.part.* | xz -dc | tar -x -C /opt/ort
NV=$(python3 -c "import nvidia;print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=/opt/ort:$(ls -d "$NV"/*/lib | paste -sd:):/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ORT_DYLIB_PATH=/opt/ort/libonnxruntime.so.1.31.1 KATZ_REPO=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export KATZ_TEST_DEVICE=cuda:0
for t in ${TESTS:-lora embedded pipeline}; do
  echo "== $t (cuda:0)"
  /opt/kb/$t --test-threads 1 2>&1 | grep -E "^test |test result|panicked|error" | head -40 || true
done
for m in sync async; do
  /opt/kb/katz demo --device cuda:0 --lora-mode $m --output "${OUT:-/tmp}/demo-cuda-$m.png" | tail -14
done
