#!/usr/bin/env bash
# Trains the tiny model family (tools/train_tiny.py) on the GPU machine, whose python3 has
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
# On several GPUs the second call can be `bash tools/device/train-tiny.sh par` (~4 min): the ControlNet
# and each LoRA style train at once, one process per GPU (from PAR_FIRST_GPU, default 0).
# Where a command may run longer: bash tools/device/train-tiny.sh all --deadline 25   (~17 min).
# Arguments after the stages go to train_tiny.py (--base-minutes 6, --resume, …); --deadline 9
# (minutes for the whole training process) is the default, so a call ends inside its 10 minutes:
# stages are cut short where needed, and say so in the log.
#
# Each call leaves in $OUT (7 files): tiny-ckpt.tar.gz (or its 15 MiB pieces .part00, …: cat them) (the diffusers checkpoint with loras/ and
# train_log.json; unpack it, then tools/export.sh --checkpoint .gpu-carry/tiny-ckpt --out DIR),
# train_log.json (losses, steps, it/s, sample metrics), train.log, and the sample grids
# samples-vae.png, samples-base.png, samples-controlnet.png, samples-lora.png of the stages it ran.
set -uo pipefail
stages=()
while [[ $# -gt 0 && $1 != -* ]]; do stages+=("$1"); shift; done
[[ ${#stages[@]} -gt 0 ]] || stages=(all)
deadline=(--deadline 9)
for a in "$@"; do [[ $a == --deadline* ]] && deadline=(); done

if [[ ! -d /tmp/site/diffusers ]]; then  # (a later call of one lease has it; gpu-path.sh stage keeps the wheels in /opt/w)
  wheels=(.gpu-carry/w/*.whl); [[ -e ${wheels[0]} ]] || wheels=(/opt/w/*.whl)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" || exit
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
out=${OUT:-out/train-tiny}
ckpt=${TINY_CKPT:-.gpu-carry/tiny-ckpt}  # (TINY_CKPT=/opt/tiny-ckpt: outside the repo copy)
mkdir -p "$out" "$ckpt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, peft, diffusers; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "diffusers", diffusers.__version__)'

start=$(date +%s)
if [[ ${stages[*]} == par ]]; then
  # the ControlNet and one LoRA per style at once, each in its own process on its own GPU (they all
  # read the base from the checkpoint; train_log.json merges what each writes): on 4 GPUs the
  # second call takes the ControlNet's 3 minutes instead of 3 + 2 × 1.5
  ngpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
  jobs_=("controlnet" "lora --styles stripes --kohya stripes" "lora --styles pastel --kohya")
  labels=(controlnet stripes pastel)
  pids=(); g=${PAR_FIRST_GPU:-0}
  for i in "${!jobs_[@]}"; do
    # shellcheck disable=SC2086
    ( CUDA_VISIBLE_DEVICES=$(( g % ngpu )) python3 tools/train_tiny.py ${jobs_[$i]} --device cuda --out "$ckpt" \
        --samples --workers $(( $(nproc) / ${#jobs_[@]} )) "${deadline[@]}" "$@" 2>&1 |
        grep --line-buffered -v -e '^Loading weights' -e 'Loading pipeline components' |
        sed -u "s/^/[${labels[$i]}] /" >> "$out/train.log" ) &
    pids+=($!); g=$((g + 1))
  done
  rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  cat "$out/train.log"
else
  python3 tools/train_tiny.py "${stages[@]}" --device cuda --out "$ckpt" --samples "${deadline[@]}" "$@" 2>&1 |
    grep --line-buffered -v -e '^Loading weights' -e 'Loading pipeline components' | tee "$out/train.log"
  rc=${PIPESTATUS[0]}
fi
echo "train-tiny: train_tiny.py exited $rc after $(( $(date +%s) - start )) s" | tee -a "$out/train.log"

# what there is, also after a failure
tar -C "$(dirname "$ckpt")" -czf "$out/tiny-ckpt.tar.gz" --exclude samples "$(basename "$ckpt")"
if (( $(stat -c %s "$out/tiny-ckpt.tar.gz") > 15 * 1048576 )); then  # a file from $OUT is at most 16 MiB
  split -b 15M -d "$out/tiny-ckpt.tar.gz" "$out/tiny-ckpt.tar.gz.part" && rm "$out/tiny-ckpt.tar.gz"
fi
cp "$ckpt/train_log.json" "$out/" 2>/dev/null
for f in "$ckpt"/samples/*.png; do [[ -e $f ]] && cp "$f" "$out/samples-$(basename "$f")"; done
ls -la "$out"
exit "$rc"
