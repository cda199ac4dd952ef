#!/usr/bin/env bash
# Full-size SDXL on a big CPU host (the GPU machine's CPUs): export a seeded full-size bundle with
# tools/export_bundle.py, then run it through `katz generate` with a ControlNet and a LoRA.
# Needs ~40 GB of memory and ~20 GB of disk; ~4 minutes of export on 16 cores.
#
# Run on the device machine (its python3 has torch, transformers, onnx, onnxruntime; diffusers
# and importlib_metadata travel as wheels in .gpu-carry/w), with the stripped katz binary and the
# xz-packed libonnxruntime.so.1.31.1 in .gpu-carry/katz:
#   mkdir -p .gpu-carry/w .gpu-carry/katz
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu-carry/w diffusers==0.42.1 importlib_metadata
#   strip -o .gpu-carry/katz/katz target/release/katz
#   xz -c .katz/ort/libonnxruntime.so.1.31.1 > .gpu-carry/katz/libonnxruntime.so.1.31.1.xz
#   device run (carry .gpu-carry/w .gpu-carry/katz): bash tools/device/sdxl-cpu-smoke.sh
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu-carry/w/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /opt/ort /opt/sdxl
xz -dc .gpu-carry/katz/libonnxruntime.so.1.31.1.xz > /opt/ort/libonnxruntime.so.1.31.1
t0=$(date +%s)
python3 tools/export_bundle.py --config sdxl --random-init --out /opt/sdxl/base --no-references \
  --example-lora /opt/sdxl/lora-r8.safetensors 2>&1 | grep -E "onnx:|rror|exporting|LoRA|UNet2D"
echo "export: $(( $(date +%s) - t0 )) s"; du -sh /opt/sdxl/*
python3 -c "from PIL import Image, ImageDraw; im=Image.new('RGB',(256,256)); d=ImageDraw.Draw(im); d.ellipse([40,40,200,200], outline=(255,255,255), width=6); im.save('/opt/cond256.png')"
t0=$(date +%s)
ORT_DYLIB_PATH=/opt/ort/libonnxruntime.so.1.31.1 .gpu-carry/katz/katz generate --bundle /opt/sdxl/base \
  --prompt "a photo of a cat on a sofa" --size 256x256 --steps 2 \
  --controlnet /opt/sdxl/base-controlnet=/opt/cond256.png:0.5 --lora /opt/sdxl/lora-r8.safetensors:0.8 \
  --output "${OUT:-/tmp}/sdxl-256.png"
echo "katz generate wall: $(( $(date +%s) - t0 )) s"
