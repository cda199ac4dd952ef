#!/usr/bin/env bash
# Trains the tiny model family (tools/train_tiny.py, issue #9) on the GPU machine, whose python3 has
# torch, transformers and peft; diffusers travels as a wheel (as for bench-diffusers.sh).
#
# Here, once: pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu-carry/w diffusers==0.42.1 importlib_metadata
#
# A `run` command lasts at most 10 minutes, so the family trains in two calls on one warm machine;
# the checkpoint stays there in .gpu-carry/tiny-ckpt (git-ignored) between them:
#   bash tools/device/train-tiny.sh vae base           carry [".gpu-carry/w"]   ~9 min (VAE 3, base cut to fit --deadline 9)
#   bash tools/device/train-tiny.sh controlnet lora    carry [".gpu-carry/w"]   ~7 min (ControlNet 3, 2 LoRAs 1.5 each)
# (timeout_s 600). If the machine went back between the calls, unpack the first call's
# tiny-ckpt.tar.gz into .gpu-carry/ here and add ".gpu-carry/tiny-ckpt" to the second call's carry.
# Where a command may run longer: bash tools/device/train-tiny.sh all --deadline 25   (~17 min).
# Arguments after the stages go to train_tiny.py (--base-minutes 6, --resume, …); --deadline 9
# (minutes for the whole training process) is the default, so a call ends inside its 10 minutes:
# stages are cut short where needed, and say so in the log.
#
# Each call leaves in $OUT (7 files): tiny-ckpt.tar.gz (the diffusers checkpoint with loras/ and
# train_log.json; unpack it, then tools/export.sh --checkpoint .gpu-carry/tiny-ckpt --out DIR),
# train_log.json (losses, steps, it/s, sample metrics), train.log, and the sample grids
# samples-vae.png, samples-base.png, samples-controlnet.png, samples-lora.png of the stages it ran.
set -uo pipefail
stages=()
while [[ $# -gt 0 && $1 != -* ]]; do stages+=("$1"); shift; done
[[ ${#stages[@]} -gt 0 ]] || stages=(all)
deadline=(--deadline 9)
for a in "$@"; do [[ $a == --deadline* ]] && deadline=(); done

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-carry/w/*.whl || exit
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
out=${OUT:-out/train-tiny}
ckpt=.gpu-carry/tiny-ckpt
mkdir -p "$out" "$ckpt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, peft, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "diffusers", diffusers.__version__)'

start=$(date +%s)
python3 tools/train_tiny.py "${stages[@]}" --device cuda --out "$ckpt" --samples "${deadline[@]}" "$@" 2>&1 |
  grep --line-buffered -v -e '^Loading weights' -e 'Loading pipeline components' | tee "$out/train.log"
rc=${PIPESTATUS[0]}
echo "train-tiny: train_tiny.py exited $rc after $(( $(date +%s) - start )) s" | tee -a "$out/train.log"

# what there is, also after a failure
tar -C "$(dirname "$ckpt")" -czf "$out/tiny-ckpt.tar.gz" --exclude samples "$(basename "$ckpt")"
cp "$ckpt/train_log.json" "$out/" 2>/dev/null
for f in "$ckpt"/samples/*.png; do [[ -e $f ]] && cp "$f" "$out/samples-$(basename "$f")"; done
ls -la "$out"
exit "$rc"
