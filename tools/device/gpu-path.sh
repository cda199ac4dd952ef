#!/usr/bin/env bash
# The GPU path on the GPU machine, in one sitting: the device-resident loop's tests on
# the tiny bundles, then the full-size SDXL benchmark against diffusers in the same sitting.
#
#   bash tools/device/gpu-path.sh stage     copy what this call carried into /opt (ORT pieces,
#                                           binaries, wheels); start the SDXL export in the
#                                           background once the wheels are there
#   bash tools/device/gpu-path.sh tests     GPU tests: kernels vs CPU, device loop vs host loop,
#                                           parity with diffusers on cuda:0, ControlNet sessions; the
#                                           device tests again on the tiny bundle with a UNet prelude
#   bash tools/device/gpu-path.sh export    the full-size SDXL --gpu bundle + ControlNet, in the
#                                           foreground (--no-check, fusions in 3 processes); run it
#                                           in the call that carries the wheels: a background
#                                           process ends with its call
#   bash tools/device/gpu-path.sh bench     diffusers on GPU 0 (tools/bench_diffusers.py, writes the
#                                           rank-64 LoRA files; 0-3 serial ControlNets without LoRA
#                                           too), then `katz bench pipeline` on one GPU with it as the
#                                           baseline, with dynamic and with static shapes
#   bash tools/device/gpu-path.sh multi     katz on 2 GPUs (split guidance; ControlNets on GPU 1) and
#                                           4 GPUs (ControlNets on GPUs 1-3; split + ControlNets)
#   bash tools/device/gpu-path.sh service   RabbitMQ + Redis from .gpu-carry/svc (services-pack.sh), then
#                                           katz bench controlnet: serial, parallel, redis, ipc
#                                           (worker on GPU 1), tiny bundles and full-size SDXL, and
#                                           the service tests
#   bash tools/device/gpu-path.sh profile   8 static-shape steps under ONNX Runtime's profiler: time by
#                                           operator, and the nodes not on CUDA (CUDA-graph blockers)
#   bash tools/device/gpu-path.sh workload  the workload study on GPUs: a service B trace into one worker per GPU
#                                           (full-size SDXL), async vs sync LoRA; katz report
#   bash tools/device/gpu-path.sh servicebench  katz against a diffusers queue worker on GPU 0, through
#                                           RabbitMQ + Redis: `katz bench service` (a service B mix,
#                                           1024², 50 steps, all at once) into `katz worker`, then into
#                                           tools/diffusers_worker.py; jobs/s, p50/p99, the ratios
#                                           (SB_JOBS, SB_WARMUP, SB_SIZE, SB_STEPS, SB_RATE, SB_MAX_CONTROLNETS,
#                                           SB_MAX_LORAS, KATZ_WORKER_ARGS; carry the pika, redis and
#                                           msgpack wheels in $C/w)
#   bash tools/device/gpu-path.sh baseline  diffusers alone (0C/0L, 1C/1L, 3C/2L) on GPU 0
#   bash tools/device/gpu-path.sh split     split-guidance parity test; katz static shapes on 1 GPU, split on
#                                           2, split + ControlNets on 4, against `baseline`
#   bash tools/device/gpu-path.sh quality   the quality report: the trained family's checkpoint (TINY_CKPT, else
#                                           rebuilt from bundles/shapes) exported fp16, then
#                                           tools/quality_report.py on GPUs (fp32, fp16, split)
#   bash tools/device/gpu-path.sh graphs    CUDA graphs: graph-vs-none tests (tiny), then static shapes
#                                           without and with --cuda-graph on 1, 2 (split), 4 GPUs
#   bash tools/device/gpu-path.sh placement 3C/2L on 4 GPUs with CUDA graphs: peer-copy rates, the
#                                           ControlNets placed several ways (PLACEMENTS for the split
#                                           ones), each with its per-step critical path, and a
#                                           profile of the ControlNet sessions
#   bash tools/device/gpu-path.sh eight     8 GPUs: the paper's placement, the halves on GPUs
#                                           0 and 1 and each ControlNet once per half (2/3, 4/5, 6/7)
#   bash tools/device/gpu-path.sh fastpath  the worker at the fast path's speed (carried brokers): bench pipeline with
#                                           CUDA graphs (the reference), then `katz worker` cold (empty graph
#                                           cache) and warm: ready time, bucket memory, first vs steady 0C/0L
#                                           job, the same job twice (PNG bytes), a bucket's first use; the
#                                           ready time with every bucket at load (FAST_ALL=0 skips it); `katz
#                                           generate` on the warm cache (FAST_GENERATE=0 skips it)
#   bash tools/device/gpu-path.sh cnpath    ControlNet jobs on GPU 0: diffusers 0C/0L, 1C/1L, 3C/2L (CN_DIFFUSERS=0 skips
#                                           it once the LoRAs exist), `bench pipeline` static + CUDA graphs, then
#                                           `katz worker` hosting the ControlNet (cold, warm): ready time, the same
#                                           three configurations submitted → finished (CN_JOBS each), and
#                                           `katz generate` 1C/1L on the warm cache (CN_BENCH=0: no diffusers, no
#                                           bench; CN_WORKER=0: no worker, no generate)
#   bash tools/device/gpu-path.sh ready     the worker's ready time: a cold start, then FAST_RESTARTS (3) warm
#                                           restarts with two 0C/0L jobs each and where each load went;
#                                           `katz generate` on the warm cache (wall vs pipeline)
#   bash tools/device/gpu-path.sh vae       the VAE decoder of the SDXL --gpu bundle: fp16 vs fp32 image error
#                                           and decode times (katz fp16, katz fp32, eager diffusers fp16)
#                                           at 1024² (whole) and 2048² (tiled), tools/vae_check.py → vae-*.json
#   bash tools/device/gpu-path.sh determinism  the same 1024² job twice and from another load on the
#                                           SDXL --gpu bundle: its deterministic graphs must repeat the PNG;
#                                           the fused GroupNorm's differences counted (tests/gpu.rs)
#   bash tools/device/gpu-path.sh peer      the compiled peer: diffusers' UNet step eager and under torch.compile
#                                           (PEER_MODES, default reduce-overhead) with compile times, then `katz bench
#                                           pipeline` 0C/0L static + CUDA graphs against it; the 2 × rank-64 LoRA merge
#                                           over the SDXL bundle with each merge kernel (MERGE_KERNELS), fp16 weights
#   bash tools/device/gpu-path.sh knobs     the graphed 0C/0L run (static shapes, CUDA graphs) once per set of CUDA-provider
#                                           options in KNOBS (sets split by ';', '-' for katz's own; default
#                                           "-;prefer_nhwc=1;fuse_conv_bias=1"), through KATZ_CUDA_OPTIONS
#   bash tools/device/gpu-path.sh fp8       the fp8 GPU test (tests/gpu.rs); the graphed step (static shapes, CUDA
#                                           graphs; FP8_CONFIGS, default 0C/0L,1C/1L) with --precision bundle and fp8
#                                           back to back, GPU 0; then two jobs (the second with a LoRA) generated in
#                                           both: fp8's relative difference and SSIM against fp16 ($O/fp8-deviation.json);
#                                           the export makes the fp8 graphs
#                                           (EXPORT_FP8= leaves them out); FP8_UNFUSED=1 also benches fp8
#                                           graphs rewritten --no-fuse (every quantize a kernel of its own)
#   bash tools/device/gpu-path.sh prelude   the UNet prelude: $S/base-prelude made from an SDXL bundle exported with
#                                           EXPORT_ARGS=--no-prelude (tools/job_prelude.py, fp8 graphs again), the graphed
#                                           step of both (PRELUDE_PRECISIONS, default "bundle fp8"), then the same jobs
#                                           from both (CUDA graph and bound; one with a LoRA): relative difference, SSIM
#   bash tools/device/gpu-path.sh rewrite   the step rewrite (katz's GEGLU, convolution biases folded): $S/base-rewrite and
#                                           $S/base-controlnet-rewrite made from bundles exported with
#                                           EXPORT_ARGS=--no-step-rewrite (tools/step_rewrite.py), the graphed step of both
#                                           (REWRITE_PRECISIONS, default "bundle fp8"; REWRITE_CONFIGS, default 0C/0L,1C/1L),
#                                           then the same jobs from both (REWRITE_PATHS, default "graph bound": CUDA graph
#                                           and bound; REWRITE_JOBS, default "0 1 2": plain, with a LoRA, with a
#                                           ControlNet): relative difference, SSIM
#   bash tools/device/gpu-path.sh ncu       Nsight Compute: every kernel of a 3-step static-shape 0C/0L run timed
#                                           (gpu__time_duration), then tools/ncu_step_summary.py: one UNet step by
#                                           kernel family ($O/ncu.csv.gz)
#   bash tools/device/gpu-path.sh all       tests, bench, multi (export waited for)
#
# Here, once (C = .gpu-carry, ignored by git):
#   PIECE_MB=36 bash ../shared/gpu/pack-onnxruntime-cuda.sh   (6 pieces in $C/ort: a call carries the
#                                           repo, ~28 MB since bundles/shapes, + one piece ≤ 64 MiB)
#   cargo build --release && cargo test --release --no-run
#   mkdir -p $C/katz $C/kt $C/w $C/bins; strip -o $C/katz/katz target/release/katz
#   strip the test binaries gpu, parity, controlnet, pipeline, vae and katz-kernels' lib tests into $C/kt/
#   tar -C $C -cf - katz kt | xz -9 > $C/bins/bins.tar.xz        (carry $C/bins, not katz/ kt/)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d $C/w diffusers==0.42.1 importlib_metadata
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --platform any \
#     -d $C/w pika==1.4.4 redis==8.1.0 msgpack==1.2.4          (servicebench: tools/diffusers_worker.py)
# There: one call per ORT piece carrying it (and, while it fits 64 MiB, binaries), each running
#   `stage`; then `all` (or `tests`, `export`, `bench` in separate calls, back to back).
# env: OUT (the device call's result folder: the JSON, SVG, logs go there as gpu-path.tar.gz; the runs write to
#      /tmp/gpu-path, which lasts between calls of one lease — the diffusers baseline of `bench`
#      is read by `multi` and `service`), SDXL (bundle dir, default /opt/sdxl), CONFIGS,
#      STEPS (50), SIZE (1024), PEAK_TFLOPS (the GPU's measured bf16 GEMM rate, for MFU)
set -uo pipefail
C=${KATZ_CARRY:-.gpu-carry}
O=/tmp/gpu-path
S=${SDXL:-/opt/sdxl}
mkdir -p "$O" /opt/ortp /opt/ort /opt/kb /opt/w "$S"

setup() {
  if [[ -z ${NO_ORT:-} && ! -f /opt/ort/.complete ]]; then  # (a failed unpack, e.g. before the last piece came, leaves no marker)
    rm -rf /opt/ort && mkdir -p /opt/ort
    { cat /opt/ortp/ort.tar.xz.part.* | xz -dc | tar -x -C /opt/ort; } || { echo "ONNX Runtime pieces incomplete: $(ls /opt/ortp | tr '\n' ' ')"; exit 1; }
    touch /opt/ort/.complete
  fi
  NV=$(python3 -c "import nvidia;print(list(nvidia.__path__)[0])")
  export LD_LIBRARY_PATH=/opt/ort:$(ls -d "$NV"/*/lib | paste -sd:):/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  export ORT_DYLIB_PATH=/opt/ort/libonnxruntime.so.1.31.1 KATZ_REPO=$PWD PYTHONUNBUFFERED=1
  if compgen -G "/opt/w/*.whl" >/dev/null && [[ ! -d /tmp/site/diffusers ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /opt/w/*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
}

export_bg() {
  # the export needs only python (torch, diffusers): it can run while the other pieces travel
  [[ -f $S/done ]] && return 0
  if [[ -f $S/pid ]] && kill -0 "$(cat "$S/pid")" 2>/dev/null; then return 0; fi
  [[ -d /tmp/site/diffusers ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /opt/w/*.whl || return 1
  # its own session (setsid): it outlives the call that started it, so the next calls can carry
  # the other pieces while it runs (it ends when the machine goes back)
  cat > /opt/export-run.sh <<EOS
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
t0=\$(date +%s)
python3 tools/export_bundle.py --config sdxl --random-init --gpu ${EXPORT_FP8---fp8} ${EXPORT_ARGS:-} --out "$S/base" --no-references \\
  --no-check --jobs "${EXPORT_JOBS:-3}" --example-lora "$S/loras/lora0.safetensors" > "$S/export.log" 2>&1 && echo "export: \$(( \$(date +%s) - t0 )) s" >> "$S/export.log" && touch "$S/done"
EOS
  setsid bash /opt/export-run.sh </dev/null >/dev/null 2>&1 &
  echo $! > "$S/pid"
  echo "export started in the background (pid $(cat "$S/pid"), log $S/export.log; it runs on until the machine goes back)"
}

stage() {
  cp "$C"/ort/ort.tar.xz.part.* /opt/ortp/ 2>/dev/null || true
  cp "$C"/katz/* "$C"/kt/* /opt/kb/ 2>/dev/null || true
  if [[ -f $C/bins/bins.tar.xz ]]; then  # katz + test binaries, stripped, xz'd (5 MB instead of 38)
    rm -rf /tmp/bx; mkdir -p /tmp/bx && xz -dc "$C/bins/bins.tar.xz" | tar -x -C /tmp/bx && cp /tmp/bx/*/* /opt/kb/
  fi
  cp "$C"/w/*.whl /opt/w/ 2>/dev/null || true
  [[ -f $C/svc/svc.tar.xz ]] && bash tools/device/services-pack.sh unpack && echo "services unpacked into /opt/svc"
  ls /opt/ortp /opt/kb /opt/w | tr '\n' ' '; echo
  if compgen -G "/opt/w/*.whl" >/dev/null; then export_bg; fi
  if [[ -f $S/pid ]]; then
    kill -0 "$(cat "$S/pid")" 2>/dev/null && echo "export running (pid $(cat "$S/pid"))" || echo "export not running"
  fi
  [[ -f $S/export.log ]] && tail -2 "$S/export.log"
  return 0
}

tests() {
  setup
  export KATZ_TEST_DEVICE=cuda:0
  if [[ -x /opt/kb/kernels ]]; then
    echo "== katz-kernels GPU tests"
    /opt/kb/kernels --include-ignored --test-threads 1 2>&1 | grep -E "^test |test result|panicked" | tail -15
  fi
  echo "== device loop vs host loop (tests/gpu.rs)"
  /opt/kb/gpu --ignored --test-threads 1 --nocapture --skip an_fp16_bundle --skip fp8_graphs --skip the_prelude_gives ${GPU_TEST_ARGS:-} 2>&1 | grep -E "^test |test result|panicked|relative|ControlNets|identical|DIFFERENT|error" | head -70
  echo "== the UNet prelude: tests/gpu.rs again on bundles/tiny-sdxl hoisted (tools/job_prelude.py)"
  rm -rf /tmp/tiny-prelude /tmp/tiny-prelude-cn && cp -r bundles/tiny-sdxl /tmp/tiny-prelude && cp -r bundles/tiny-sdxl-controlnet /tmp/tiny-prelude-cn
  python3 tools/job_prelude.py /tmp/tiny-prelude | tail -2 && python3 tools/job_prelude.py /tmp/tiny-prelude-cn | tail -1
  KATZ_GPU_PRELUDE=/tmp/tiny-prelude KATZ_GPU_TINY=/tmp/tiny-prelude KATZ_GPU_PRELUDE_CN=/tmp/tiny-prelude-cn KATZ_GPU_TINY_CN=/tmp/tiny-prelude-cn \
    /opt/kb/gpu --ignored --test-threads 1 --nocapture \
    --skip an_fp16_bundle --skip fp8_graphs ${GPU_TEST_ARGS:-} 2>&1 | grep -E "^test |test result|panicked|prelude|relative|error" | head -40
  for t in parity controlnet pipeline vae; do
    [[ -x /opt/kb/$t ]] || continue
    echo "== $t (cuda:0)"
    /opt/kb/$t --test-threads 1 2>&1 | grep -E "^test |test result|panicked|error" | head -30
  done
}

export_wait() {
  if [[ ! -f $S/done ]]; then
    if ! { [[ -f $S/pid ]] && kill -0 "$(cat "$S/pid")" 2>/dev/null; }; then
      export_bg
    fi
    echo "waiting for the SDXL export ($S/export.log)"
    while [[ ! -f $S/done ]] && kill -0 "$(cat "$S/pid")" 2>/dev/null; do sleep 5; done
  fi
  grep -E "export:|fused|MultiHead|rror|onnx:" "$S/export.log" | tail -20
  [[ -f $S/done ]] || { echo "the export failed"; tail -30 "$S/export.log"; return 1; }
  du -sh "$S"/* 2>/dev/null | head
}

katz_bench() {  # name, then extra flags (BENCH_LORAS: other LoRA files, comma-separated; BENCH_BUNDLE: another bundle)
  local name=$1; shift
  echo "== katz bench pipeline: $name"
  /opt/kb/katz bench pipeline --device cuda:0 --bundle "${BENCH_BUNDLE:-$S/base}" --controlnet "${BENCH_CN:-$S/base-controlnet}" \
    --loras "${BENCH_LORAS:-$S/loras/lora0.safetensors,$S/loras/lora1.safetensors}" \
    --size "${SIZE:-1024}" --steps "${STEPS:-50}" $([[ -f $BASE ]] && echo --baseline "$BASE") --unet-tflop 6.76 \
    ${PEAK_TFLOPS:+--peak-tflops $PEAK_TFLOPS} --out "$O/pipeline-$gpu-$name-$day.json" "$@" 2>&1 | grep -v " WARN " | tail -9
}

bench_setup() {
  setup
  export_wait || return 1
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
  ngpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
  day=$(date +%F)
  BASE=$O/diffusers-$gpu-$day.json
  # the bf16 GEMM rate of an H200 in the project's design measurements (not re-measured here)
  case $gpu in *H200*) PEAK_TFLOPS=${PEAK_TFLOPS:-780} ;; *H100*) PEAK_TFLOPS=${PEAK_TFLOPS:-758} ;; esac
}

bench() {  # diffusers on GPU 0, then katz on one GPU
  bench_setup || return 1
  echo "== diffusers (fp16, SDPA), same sitting, GPU 0"
  CUDA_VISIBLE_DEVICES=0 python3 tools/bench_diffusers.py --size "${SIZE:-1024}" --steps "${STEPS:-50}" \
    --configs 0c0l,1c0l,2c0l,3c0l,1c1l,3c2l --lora-dir "$S/loras" --out "$BASE" 2>&1 \
    | grep -vE "Warning|LoRA keys|float32" | tail -11
  katz_bench 1gpu --configs "${CONFIGS:-0C/0L,1C/1L,3C/2L}"
  katz_bench 1gpu-static --configs 0C/0L,3C/2L --static-shapes
}

bench_multi() {  # katz on 2 and 4 GPUs (the diffusers baseline of `bench` in this sitting)
  bench_setup || return 1
  [[ -f $BASE ]] || { echo "run 'bench' first (the diffusers baseline)"; return 1; }
  if (( ngpu >= 2 )); then
    katz_bench 2gpu-split --configs 0C/0L,1C/1L,3C/2L --split-guidance cuda:1
    katz_bench 2gpu-split-static --configs 0C/0L --split-guidance cuda:1 --static-shapes
    katz_bench 2gpu-cn --configs 1C/1L,3C/2L --controlnet-devices cuda:1 --controlnet-mode parallel
  fi
  if (( ngpu >= 4 )); then
    katz_bench 4gpu-cn --configs 3C/2L --controlnet-devices cuda:1,cuda:2,cuda:3 --controlnet-mode parallel
    katz_bench 4gpu-split-cn --configs 3C/2L --split-guidance cuda:1 --controlnet-devices cuda:2,cuda:3,cuda:2 --controlnet-mode parallel
    katz_bench 4gpu-split-cn-static --configs 3C/2L --split-guidance cuda:1 --controlnet-devices cuda:2,cuda:3,cuda:2 --controlnet-mode parallel --static-shapes
  fi
}

service() {  # RabbitMQ + Redis carried in .gpu-carry/svc (services-pack.sh); ControlNet transports on GPUs
  setup
  bash tools/device/services-pack.sh start || return 1
  local wdev=cuda:1 gpu day
  (( $(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l) > 1 )) || wdev=cuda:0
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-'); day=$(date +%F)
  if [[ ${SERVICE_TINY:-1} == 1 ]]; then
    echo "== katz bench controlnet, tiny bundles: pipeline on cuda:0, ControlNet worker on $wdev"
    /opt/kb/katz bench controlnet --device cuda:0 --worker-device "$wdev" \
      --modes serial,parallel,redis,ipc --counts 0,1,2,3 --repeat 3 \
      --out "$O/controlnet-transports-tiny-$gpu-$day.json" 2>&1 | grep -v " WARN " | tail -20
  fi
  if [[ -f $S/done ]]; then
    # no redis mode at full size: 215 MB of residuals per ControlNet step cost ~0.55 s through
    # Redis alone (the loopback line of the tiny run measures it)
    echo "== katz bench controlnet, full-size SDXL 1024², batch 2: pipeline on cuda:0, worker on $wdev"
    BASE=$O/diffusers-$gpu-$day.json
    /opt/kb/katz bench controlnet --device cuda:0 --worker-device "$wdev" \
      --bundle "$S/base" --controlnet "$S/base-controlnet" --size 1024 --steps 20 --guidance 7.5 \
      --modes serial,parallel,ipc --counts "${SERVICE_COUNTS:-0,1,2,3}" --repeat 2 $([[ -f $BASE ]] && echo --baseline "$BASE") \
      --out "$O/controlnet-transports-sdxl-$gpu-$day.json" 2>&1 | grep -v " WARN " | tail -20
    if [[ ${IPC_DEBUG:-1} == 1 ]]; then
      echo "== where a CUDA IPC step's time goes (one ControlNet, 6 steps, both sides' debug timings)"
      KATZ_LOG=katz_actors=debug KATZ_WORKER_LOG=katz_actors=debug /opt/kb/katz bench controlnet \
        --device cuda:0 --worker-device "$wdev" --bundle "$S/base" --controlnet "$S/base-controlnet" \
        --size 1024 --steps 6 --guidance 7.5 --modes ipc --counts 1 --repeat 1 2>&1 \
        | grep -E "CUDA IPC|residuals sent|session started|session closed|ms/step" | sed 's/\x1b\[[0-9;]*m//g' | tail -40
    fi
  fi
  if [[ -x /opt/kb/service && ${SERVICE_TESTS:-1} == 1 ]]; then
    echo "== service tests (KATZ_BIN, the pipeline on cuda:0)"
    # (the broker-restart test restarts the host's own RabbitMQ and Redis services, which the
    # carried ones are not: it runs in .ci/run, not here)
    KATZ_BIN=/opt/kb/katz KATZ_DEVICE=cuda:0 /opt/kb/service --test-threads 1 \
      --skip rabbitmq_and_redis_restarts_lose_no_job 2>&1 | grep -E "^test |test result|panicked" | head -30
  fi
}

workload() {  # the workload study on GPUs: a service B trace replayed into one worker per GPU (full-size
              # SDXL + its ControlNet, rank-8 LoRA files), async vs sync LoRA, then katz report
  setup
  export_wait >/dev/null || return 1
  bash tools/device/services-pack.sh start || return 1
  local ngpu run prefix q cfgs=() mode rate g
  ngpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l); run=$(date +%s)
  python3 -c "from PIL import Image, ImageDraw; im = Image.new('RGB', (1024, 1024)); d = ImageDraw.Draw(im)
for r in range(64, 512, 64): d.ellipse((512 - r, 512 - r, 512 + r, 512 + r), outline='white', width=4)
im.save('$O/cond-1024.png')"
  for mode in async sync; do
    # one worker per GPU for the mode's whole sweep (loading takes ~40 s); a queue per mode
    q=katz.jobs.wl$run.$mode
    local pids=()
    for g in $(seq 0 $((ngpu - 1))); do
      KATZ_LOG=warn /opt/kb/katz worker --device "cuda:$g" --bundle "$S/base" --controlnet "$S/base-controlnet" \
        --queue "$q" --name "wl-$g" --lora-dir /tmp/wl-store --lora-mode "$mode" >"$O/w-$mode-$g.log" 2>&1 &
      pids+=($!)
    done
    sleep 40  # sessions on every GPU
    for rate in ${WL_RATES:-0.2 0.5}; do
      prefix=wl$run-$mode-${rate/./p}
      /opt/kb/katz trace gen --service B --requests "${WL_JOBS:-24}" --rate "$rate" --seed 7 \
        --stats tools/workload/katz-trace-stats.json --out "$O/trace-$rate.json" >/dev/null
      /opt/kb/katz trace replay "$O/trace-$rate.json" --bundle "$S/base" --store /tmp/wl-store --speed 1 \
        --queue "$q" --id-prefix "$prefix" --steps 50 --size 1024x1024 \
        --controlnet-models "$(python3 -c "import json;print(json.load(open('$S/base-controlnet/bundle.json'))['name'])")" \
        --image "$O/cond-1024.png" 2>&1 | tail -1
      local t0=$SECONDS
      while (( SECONDS - t0 < 300 )); do  # (no redis-cli there: katz report says what is unfinished)
        /opt/kb/katz report --config "w=$prefix" --out "$O/.wait" >/dev/null 2>&1 && python3 -c "import json, sys
r = json.load(open('$O/.wait/report.json'))[0]; sys.exit(0 if r['unfinished'] == 0 and r['jobs'] >= ${WL_JOBS:-24} else 1)" && break
        sleep 2
      done
      echo "$mode @ $rate/s: drained $(( SECONDS - t0 )) s after the last publish"
      cfgs+=(--config "$mode@$rate=$prefix")
    done
    kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null
  done
  /opt/kb/katz report "${cfgs[@]}" --out "$O/workload-$(date +%F)"
  cp "$O/workload-$(date +%F)"/* "$O/" 2>/dev/null || true
}

servicebench() {  # katz vs a diffusers queue worker on GPU 0: the same trace mix through RabbitMQ + Redis
  setup
  export_wait >/dev/null || return 1
  bash tools/device/services-pack.sh start || return 1
  cp "$C"/w/pika-*.whl "$C"/w/redis-*.whl "$C"/w/msgpack-*.whl /opt/w/ 2>/dev/null || true
  if ! python3 -c "import pika, redis, msgpack" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      /opt/w/pika-*.whl /opt/w/redis-*.whl /opt/w/msgpack-*.whl || { echo "carry the pika, redis, msgpack wheels in $C/w"; return 1; }
  fi
  python3 -c "import peft" 2>/dev/null || echo "warning: no peft: the diffusers worker cannot load LoRAs"
  local gpu day run base cn n=${SB_JOBS:-16} size=${SB_SIZE:-1024} steps=${SB_STEPS:-50} pid t0 q
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-'); day=$(date +%F); run=$(date +%s)
  base=$(python3 -c "import json;print(json.load(open('$S/base/bundle.json'))['name'])")
  cn=$(python3 -c "import json;print(json.load(open('$S/base-controlnet/bundle.json'))['name'])")
  python3 -c "from PIL import Image, ImageDraw; im = Image.new('RGB', ($size, $size)); d = ImageDraw.Draw(im)
for r in range(64, $size // 2, 64): d.ellipse(($size // 2 - r, $size // 2 - r, $size // 2 + r, $size // 2 + r), outline='white', width=4)
im.save('$O/cond-$size.png')"
  # the same mix for both: service B (seed 7), the jobs' adapters capped where asked
  local bench=(/opt/kb/katz bench service --service B --requests "$n" --seed 7 --stats tools/workload/katz-trace-stats.json
    --bundle "$S/base" --controlnet-models "$cn" --image "$O/cond-$size.png" --store /tmp/sb-store
    --size "${size}x$size" --steps "$steps" --guidance 7.5 --timeout-s "${SB_TIMEOUT_S:-420}" --warmup "${SB_WARMUP:-2}"
    ${SB_RATE:+--rate $SB_RATE} ${SB_MAX_CONTROLNETS:+--max-controlnets $SB_MAX_CONTROLNETS}
    ${SB_MAX_LORAS:+--max-loras $SB_MAX_LORAS})
  local dj=$O/servicebench-diffusers-$gpu-$day.json kj=$O/servicebench-katz-$gpu-$day.json
  rm -f "$dj" "$kj"
  if [[ ${SB_DIFFUSERS:-1} == 1 ]]; then
    echo "== diffusers worker (tools/diffusers_worker.py, fp16, SDPA) on cuda:0"
    q=katz.jobs.sb$run.diffusers
    python3 tools/diffusers_worker.py --queue "$q" --config sdxl --base "$base" --controlnet "$cn" \
      --lora-dir /tmp/sb-store --device cuda:0 --name "sb-diffusers-$run" >"$O/sb-diffusers-worker.log" 2>&1 &
    pid=$!; t0=$SECONDS
    until python3 -c "import redis, sys; sys.exit(0 if redis.Redis().hget('katz:worker:sb-diffusers-$run', 'status') == b'ready' else 1)" 2>/dev/null; do
      kill -0 $pid 2>/dev/null || { echo "the diffusers worker ended:"; tail -20 "$O/sb-diffusers-worker.log"; break; }
      (( SECONDS - t0 > 300 )) && { echo "the diffusers worker is not ready after 300 s"; break; }
      sleep 2
    done
    if kill -0 $pid 2>/dev/null; then
      echo "ready after $(( SECONDS - t0 )) s"
      "${bench[@]}" --queue "$q" --label diffusers --id-prefix "sb$run-diffusers" --out "$dj" 2>&1 | tail -14
    fi
    kill $pid 2>/dev/null; wait $pid 2>/dev/null
  fi
  echo "== katz worker on cuda:0 ${KATZ_WORKER_ARGS:-}"
  q=katz.jobs.sb$run.katz
  KATZ_LOG=warn /opt/kb/katz worker --device cuda:0 --bundle "$S/base" --controlnet "$S/base-controlnet" \
    --queue "$q" --name "sb-katz-$run" --lora-dir /tmp/sb-store --metrics-addr 127.0.0.1:9466 \
    ${KATZ_WORKER_ARGS:-} >"$O/sb-katz-worker.log" 2>&1 &
  pid=$!; t0=$SECONDS
  until python3 -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9466/readyz', timeout=2).status == 200 else 1)" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "the katz worker ended:"; tail -20 "$O/sb-katz-worker.log"; return 1; }
    (( SECONDS - t0 > 300 )) && { echo "the katz worker is not ready after 300 s"; kill $pid; return 1; }
    sleep 2
  done
  echo "ready after $(( SECONDS - t0 )) s"
  "${bench[@]}" --queue "$q" --label katz --id-prefix "sb$run-katz" --out "$kj" \
    $([[ -f $dj ]] && echo --baseline "$dj") 2>&1 | tail -16
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  python3 - "$kj" "$dj" <<'PY'
import json, os, sys
rs = [json.load(open(p)) for p in sys.argv[1:] if os.path.exists(p)]
for r in rs:
    print(f"{r['label']:>10}: {r['done']}/{r['jobs']} done, {r['throughput_per_s']:.4f} jobs/s, "
          f"p50 {r['latency_ms']['p50']:.0f} ms, p99 {r['latency_ms']['p99']:.0f} ms, service p50 {r['service_ms']['p50']:.0f} ms")
v = rs[0].get("vs_baseline") if rs else None
if v:
    print(f"katz / diffusers: throughput {v['throughput']:.2f}x, p50 {v['latency_p50_speedup']:.2f}x faster, "
          f"p99 {v['latency_p99_speedup']:.2f}x faster")
PY
}

profile() {  # one GPU, static shapes, 8 steps under ONNX Runtime's profiler: time by operator and
             # the nodes not on CUDA (what keeps a CUDA graph from being captured)
  bench_setup || return 1
  rm -rf "$O/prof"; mkdir -p "$O/prof"
  KATZ_ORT_PROFILE=$O/prof/p /opt/kb/katz bench pipeline --device cuda:0 --bundle "$S/base" \
    --configs 0C/0L --size "${SIZE:-1024}" --steps 8 --repeat 1 --static-shapes 2>&1 | grep -v " WARN " | tail -3
  python3 tools/ort_profile_summary.py "$O"/prof/p-unet_encoder_*.json "$O"/prof/p-unet_decoder_*.json
}

baseline() {  # diffusers only (0C/0L, 1C/1L, 3C/2L), GPU 0: the same-sitting baseline of `split`
  NO_ORT=1 bench_setup || return 1
  echo "== diffusers (fp16, SDPA), same sitting, GPU 0"
  CUDA_VISIBLE_DEVICES=0 python3 tools/bench_diffusers.py --size "${SIZE:-1024}" --steps "${STEPS:-50}" \
    --configs "${DIFFUSERS_CONFIGS:-0c0l,1c1l,3c2l}" --lora-dir "$S/loras" --out "$BASE" 2>&1 \
    | grep -vE "Warning|LoRA keys|float32" | tail -8
}

split() {  # latent parallelism: the split-vs-one-GPU parity test, then one GPU, 2 GPUs split, and
           # 4 GPUs split + ControlNets, all static shapes, against `baseline`'s diffusers
  bench_setup || return 1
  [[ -f $BASE ]] || { echo "run 'baseline' (or 'bench') first"; return 1; }
  echo "== split guidance vs one GPU (tests/gpu.rs, tiny bundles)"
  KATZ_TEST_DEVICE=cuda:0 /opt/kb/gpu --ignored --test-threads 1 --nocapture split 2>&1 \
    | grep -E "^test |test result|panicked|relative|error" | head -12
  katz_bench 1gpu-static --configs 0C/0L,3C/2L --static-shapes
  katz_bench 2gpu-split-static --configs 0C/0L,3C/2L --split-guidance cuda:1 --static-shapes
  (( ngpu >= 4 )) && katz_bench 4gpu-split-cn-static --configs 3C/2L --split-guidance cuda:1 \
    --controlnet-devices cuda:2,cuda:3,cuda:2 --controlnet-mode parallel --static-shapes
  return 0
}

quality() {  # the trained family's quality report on GPUs: the trained family's checkpoint (TINY_CKPT, default
             # /opt/tiny-ckpt; rebuilt from bundles/shapes by tools/shapes/ckpt_from_bundle.py when
             # absent) exported fp16 + fp8 (--gpu --fp8), or that export carried in $C/trained (fp16,
             # fp16-controlnet: ckpt_from_bundle.py failed on the GPU machine in run O; made here with
             # ckpt_from_bundle.py --out CK, then export_bundle.py --config tiny --checkpoint CK --gpu
             # --fp8 --no-check --out $C/trained/fp16, 10 MB), then tools/quality_report.py on the
             # committed fp32 bundles with --gpu cuda:0 --fp16-bundle --fp8 --split cuda:1 (QUALITY_SPLIT=
             # drops the split on one GPU; QUALITY_GPUS picks the cards, e.g. 2,3 beside another run);
             # the report and its images go to $OUT/quality
  setup
  local ck=${TINY_CKPT:-/opt/tiny-ckpt} q=/tmp/trained
  if [[ -f $C/trained/fp16/bundle.json && ! -f $q/fp16/bundle.json ]]; then
    mkdir -p $q && cp -r "$C"/trained/* $q/ && echo "the trained family's fp16 + fp8 export: carried"
  fi
  if [[ ! -f $q/fp16/bundle.json && ! -f $ck/unet/config.json ]]; then
    echo "== the trained checkpoint, rebuilt from bundles/shapes"
    python3 tools/shapes/ckpt_from_bundle.py --out "$ck" > /tmp/ckpt.log 2>&1
    grep -E "^checkpoint|rror|differ" /tmp/ckpt.log | tail -3
    [[ -f $ck/unet/config.json ]] || { echo "no checkpoint in $ck:"; grep -v Warning /tmp/ckpt.log | tail -8; return 1; }
  fi
  mkdir -p $q
  [[ -f $q/fp16/bundle.json ]] || python3 tools/export_bundle.py --config tiny --checkpoint "$ck" --gpu --fp8 \
    --no-check --out $q/fp16 2>&1 | grep -vE "Warning|^ |TracerWarning" | tail -3
  CUDA_VISIBLE_DEVICES=${QUALITY_GPUS:-0,1} python3 tools/quality_report.py --bundle bundles/shapes/shapes-sdxl \
    --controlnet bundles/shapes/shapes-sdxl-controlnet --lora-dir bundles/shapes/loras \
    --out "${OUT:-/tmp}/quality" --katz /opt/kb/katz --jobs "${QUALITY_JOBS:-6}" \
    --gpu cuda:0 --fp16-bundle $q/fp16 --fp16-controlnet $q/fp16-controlnet --fp8 ${QUALITY_SPLIT---split cuda:1} \
    ${QUALITY_ARGS:---bounds= --styles pastel} 2>&1 | tail -30
}

graphs() {  # CUDA graphs: the graph-vs-none tests on the tiny bundles, then static shapes
            # without and with --cuda-graph, back to back: 1 GPU, 2 GPUs split, 4 GPUs split +
            # ControlNets, against `baseline`'s diffusers of this sitting
  bench_setup || return 1
  echo "== CUDA graphs vs none (tests/gpu.rs, tiny bundles)"
  KATZ_TEST_DEVICE=cuda:0 /opt/kb/gpu --ignored --test-threads 1 --nocapture cuda_graphs 2>&1 \
    | grep -E "^test |test result|panicked|relative|rror" | head -20
  [[ -f $BASE ]] || { echo "run 'baseline' first (the diffusers baseline of this sitting)"; return 1; }
  local g
  for g in "" --cuda-graph; do
    katz_bench "1gpu-static${g:+-graph}" --configs 0C/0L,3C/2L --static-shapes $g
  done
  if (( ngpu >= 2 )); then
    for g in "" --cuda-graph; do
      katz_bench "2gpu-split-static${g:+-graph}" --configs 0C/0L,3C/2L --split-guidance cuda:1 --static-shapes $g
    done
  fi
  if (( ngpu >= 4 )); then
    for g in "" --cuda-graph; do
      katz_bench "4gpu-split-cn-static${g:+-graph}" --configs 3C/2L --split-guidance cuda:1 \
        --controlnet-devices cuda:2,cuda:3,cuda:2 --controlnet-mode parallel --static-shapes $g
    done
  fi
  return 0
}

placement() {  # the GPU path's open item: 3C/2L on 4 GPUs (static shapes, CUDA graphs), the ControlNets
               # placed several ways, each run's per-step critical path (slowest ControlNet,
               # residuals after the encoder, transport), the GPUs' peer-copy rates, then 8 steps of
               # the first placement under ONNX Runtime's profiler, against `baseline`
  bench_setup || return 1
  [[ -f $BASE ]] || { echo "run 'baseline' first"; return 1; }
  (( ngpu >= 4 )) || { echo "placement needs 4 GPUs"; return 1; }
  echo "== peer copies between GPUs (torch, 214 MB = one ControlNet's residuals at 1024², batch 2, fp32)"
  python3 - <<'PY'
import torch, time
n = 214 * 2**20 // 4
for a, b in [(1, 0), (2, 0), (3, 0), (2, 1), (3, 1), (0, 1)]:
    x = torch.randn(n, device=f"cuda:{a}"); y = torch.empty(n, device=f"cuda:{b}")
    for _ in range(3): y.copy_(x)
    torch.cuda.synchronize(a); torch.cuda.synchronize(b)
    t = time.perf_counter()
    for _ in range(10): y.copy_(x)
    torch.cuda.synchronize(a); torch.cuda.synchronize(b)
    dt = (time.perf_counter() - t) / 10
    print(f"cuda:{a} -> cuda:{b}: {dt * 1e3:.2f} ms, {n * 4 / dt / 1e9:.0f} GB/s (peer access {torch.cuda.can_device_access_peer(b, a)})")
PY
  katz_bench 4gpu-cn123-graph --configs 3C/2L --static-shapes --cuda-graph \
    --controlnet-devices cuda:1,cuda:2,cuda:3 --controlnet-mode parallel
  katz_bench 4gpu-cn123-graph-t1 --configs 3C/2L --static-shapes --cuda-graph --threads 1 \
    --controlnet-devices cuda:1,cuda:2,cuda:3 --controlnet-mode parallel
  local p
  for p in ${PLACEMENTS:-2,3,2 2,3,0}; do
    katz_bench "4gpu-split-cn${p//,/}-graph" --configs 3C/2L --split-guidance cuda:1 --static-shapes --cuda-graph \
      --controlnet-devices "cuda:${p//,/,cuda:}" --controlnet-mode parallel
  done
  rm -rf "$O/prof4"; mkdir -p "$O/prof4"
  KATZ_ORT_PROFILE=$O/prof4/p /opt/kb/katz bench pipeline --device cuda:0 --bundle "$S/base" \
    --controlnet "$S/base-controlnet" --loras "$S/loras/lora0.safetensors,$S/loras/lora1.safetensors" \
    --configs 3C/2L --size "${SIZE:-1024}" --steps 8 --repeat 1 --static-shapes \
    --controlnet-devices cuda:1,cuda:2,cuda:3 --controlnet-mode parallel 2>&1 | grep -v " WARN " | tail -3
  python3 tools/ort_profile_summary.py "$O"/prof4/p-controlnet_*.json "$O"/prof4/p-unet_*.json
}

eight() {  # the 8-GPU placement: the paper's 3C/2L placement on 8 GPUs: the guidance halves on GPUs 0 and 1,
           # each ControlNet once per half (GPUs 2/3, 4/5, 6/7), static shapes, CUDA graphs,
           # against `baseline`; the critical path is in the table's last line and the JSON
  bench_setup || return 1
  [[ -f $BASE ]] || { echo "run 'baseline' first"; return 1; }
  (( ngpu >= 8 )) || { echo "eight needs 8 GPUs, found $ngpu"; return 1; }
  katz_bench 8gpu-paper-graph --configs 0C/0L,3C/2L --split-guidance cuda:1 --static-shapes --cuda-graph \
    --controlnet-devices cuda:2/cuda:3,cuda:4/cuda:5,cuda:6/cuda:7 --controlnet-mode parallel
  katz_bench 8gpu-nosplit-graph --configs 3C/2L --static-shapes --cuda-graph \
    --controlnet-devices cuda:1,cuda:2,cuda:3 --controlnet-mode parallel
}

ready_wait() {  # pid, port: waits until /readyz answers 200 (or the process ends); prints the seconds
  python3 - "$1" "$2" <<'PY'
import os, sys, time, urllib.request
pid, port, t0 = int(sys.argv[1]), sys.argv[2], time.time()
while True:
    try:
        os.kill(pid, 0)
    except OSError:
        print("exited"); sys.exit(1)
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
            break
    except Exception:
        pass
    time.sleep(0.05)
print(f"{time.time() - t0:.2f}")
PY
}

job_ms() {  # job id: submitted → finished, ms, from its record
  /opt/kb/katz status "$1" | python3 -c "import json,sys; r=json.load(sys.stdin); print(int(r['finished_ms'])-int(r['submitted_ms']), r.get('pipeline_ms','?'), r.get('step_ms','?'), r.get('vae_decode_ms','?'))"
}

worker_bg() {  # name, log, extra args: `katz worker` on GPU 0 for fastpath/ready (their $cache, $q), in the background; sets pid
  local name=$1 log=$2; shift 2
  KATZ_CACHE_DIR=$cache KATZ_LOG=info /opt/kb/katz worker --device cuda:0 --bundle "$S/base" --controlnet "${WORKER_CN:-none}" \
    --queue "$q" --name "$name" --metrics-addr 127.0.0.1:9187 ${FAST_WORKER_ARGS:-} "$@" >"$log" 2>&1 &
  pid=$!
}

load_lines() {  # log, count: where a worker's load went (its last `count` such lines)
  sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -E "weights on the GPU|ran once|bound and captured|pipeline loaded|bucket captured|warmed up|models loaded|rror" | cut -c1-400 | tail -"$2"
}

fastpath() {  # the worker at the fast path's speed on GPU 0 (see the header)
  bench_setup || return 1
  bash tools/device/services-pack.sh start || return 1
  local cache=/tmp/katz-graphs q=katz.jobs.fast$(date +%s) name start pid ready i id
  name=$(python3 -c "import json;print(json.load(open('$S/base/bundle.json'))['name'])")
  echo "== katz bench pipeline 0C/0L, static shapes + CUDA graphs (the reference; an fp16 bundle's default: fused GroupNorm)"
  KATZ_GRAPH_CACHE=none katz_bench 1gpu-graph --configs 0C/0L --static-shapes --cuda-graph
  echo "== the same with the deterministic graphs (--deterministic)"
  KATZ_GRAPH_CACHE=none katz_bench 1gpu-graph-exact --configs 0C/0L --static-shapes --cuda-graph --deterministic true
  if [[ ${FAST_EXHAUSTIVE:-1} == 1 ]]; then
    echo "== the same with cuDNN's exhaustive algorithm search (the previous default)"
    KATZ_GRAPH_CACHE=none katz_bench 1gpu-graph-exhaustive --configs 0C/0L --static-shapes --cuda-graph --conv-search exhaustive
  fi
  rm -rf "$cache"
  for start in cold warm; do
    worker_bg "fast-$start" "$O/worker-$start.log"
    ready=$(ready_wait $pid 9187) || { echo "worker ($start) did not get ready"; tail -20 "$O/worker-$start.log"; return 1; }
    echo "== worker, $start start (graph cache $( [[ $start == cold ]] && echo empty || echo warm)): ready after $ready s"
    load_lines "$O/worker-$start.log" 14
    local n=${FAST_JOBS:-11}
    [[ $start == warm ]] && n=${FAST_WARM_JOBS:-3}
    echo "job, submitted→finished ms, pipeline ms, step ms, VAE ms"
    for i in $(seq 0 $((n - 1))); do
      id=fast-$start-$i-$RANDOM
      /opt/kb/katz submit --base "$name" --prompt "a photograph of an astronaut riding a horse" --size 1024x1024 \
        --steps "${STEPS:-50}" --guidance 7.5 --seed 7 --queue "$q" --id "$id" --wait -o "$O/fast-$start-$i.png" >/dev/null 2>&1 \
        || { echo "job $id failed"; /opt/kb/katz status "$id"; }
      echo "$start $i $(job_ms "$id")"
    done
    echo "same job (seed 7) $n times: $(sha256sum "$O"/fast-"$start"-*.png | awk '{print $1}' | sort -u | wc -l) distinct PNG(s); sizes $(stat -c %s "$O"/fast-"$start"-*.png | sort -u | tr '\n' ' ')"
    if [[ $start == warm ]]; then  # a bucket left for its first use: its first job captures it
      for i in 0 1; do
        id=fast-wide-$i-$RANDOM
        /opt/kb/katz submit --base "$name" --prompt "a photograph of an astronaut riding a horse" --size 1152x896 \
          --steps "${STEPS:-50}" --guidance 7.5 --seed 7 --queue "$q" --id "$id" --wait -o "$O/fast-wide-$i.png" >/dev/null 2>&1 \
          || { echo "job $id failed"; /opt/kb/katz status "$id"; }
        echo "1152x896 $i $(job_ms "$id")"
      done
      sed 's/\x1b\[[0-9;]*m//g' "$O/worker-$start.log" | grep -E "first job" | cut -c1-300 | tail -3
    fi
    kill -TERM $pid; wait $pid 2>/dev/null
  done
  if [[ ${FAST_ALL:-1} == 1 ]]; then
    echo "== worker, warm start, every bucket captured at load (--bucket-load all)"
    worker_bg fast-all "$O/worker-all.log" --bucket-load all
    ready=$(ready_wait $pid 9187) && echo "ready after $ready s" || echo "worker (all) did not get ready"
    sed 's/\x1b\[[0-9;]*m//g' "$O/worker-all.log" | grep -E "pipeline loaded|warmed up|models loaded|rror" | cut -c1-400 | tail -4
    kill -TERM $pid; wait $pid 2>/dev/null
  fi
  cmp -s "$O/fast-cold-0.png" "$O/fast-warm-0.png" && echo "cold and warm workers: the same PNG" || echo "cold and warm workers: PNGs DIFFER"
  [[ ${FAST_GENERATE:-1} == 1 ]] || { rm -f "$O"/fast-*-[1-9]*.png; return 0; }
  echo "== katz generate 0C/0L, fresh process, warm graph cache"
  local t0=$(date +%s.%N)
  KATZ_CACHE_DIR=$cache KATZ_LOG=info /opt/kb/katz generate --device cuda:0 --bundle "$S/base" --prompt "a photograph of an astronaut riding a horse" \
    --size 1024x1024 --steps "${STEPS:-50}" --guidance 7.5 --seed 7 -o "$O/generate.png" >"$O/generate.log" 2>&1 || tail -20 "$O/generate.log"
  echo "generate: wall $(python3 -c "import time;print(f'{time.time()-$t0:.2f}')") s"
  sed 's/\x1b\[[0-9;]*m//g' "$O/generate.log" | grep -E "pipeline total|per step|VAE|pipeline loaded|wrote" | cut -c1-300
  cmp -s "$O/generate.png" "$O/fast-warm-0.png" && echo "generate and the worker: the same PNG" || echo "generate and the worker: PNGs differ"
  rm -f "$O"/fast-*-[1-9]*.png
  return 0
}

cnpath() {  # ControlNet jobs through the worker against the bench, GPU 0 (see the header)
  bench_setup || return 1
  bash tools/device/services-pack.sh start || return 1
  local cache=/tmp/katz-graphs q=katz.jobs.cn$(date +%s) name cn pid ready i id start cfg args
  name=$(python3 -c "import json;print(json.load(open('$S/base/bundle.json'))['name'])")
  cn=$(basename "$S/base-controlnet")
  python3 -c "from PIL import Image, ImageDraw; im = Image.new('RGB', (1024, 1024)); d = ImageDraw.Draw(im)
for r in range(64, 512, 64): d.ellipse((512 - r, 512 - r, 512 + r, 512 + r), outline='white', width=4)
im.save('$O/cond-1024.png')"
  if [[ ${CN_BENCH:-1} == 1 ]] && [[ ${CN_DIFFUSERS:-1} == 1 || ! -f $S/loras/lora1.safetensors ]]; then
    echo "== diffusers (fp16, SDPA), same sitting, GPU 0: 0C/0L, 1C/1L, 3C/2L (writes the rank-64 LoRAs)"
    CUDA_VISIBLE_DEVICES=0 python3 tools/bench_diffusers.py --size 1024 --steps "${STEPS:-50}" \
      --configs "${DIFFUSERS_CONFIGS:-0c0l,1c1l,3c2l}" --lora-dir "$S/loras" --out "$BASE" 2>&1 \
      | grep -vE "Warning|LoRA keys|float32" | tail -6
  fi
  # without the diffusers run (which writes rank-64 LoRAs) the export's seeded rank-8 LoRA serves as both
  [[ -f $S/loras/lora1.safetensors ]] || cp "$S/loras/lora0.safetensors" "$S/loras/lora1.safetensors"
  if [[ ${CN_BENCH:-1} == 1 ]]; then
    echo "== katz bench pipeline, static shapes + CUDA graphs (ControlNets inline, each on its bucket's CUDA graph)"
    KATZ_GRAPH_CACHE=none katz_bench 1gpu-graph-cn --configs 0C/0L,1C/1L,3C/2L --static-shapes --cuda-graph
  fi
  [[ ${CN_WORKER:-1} == 1 ]] || return 0
  rm -rf "$cache"
  for start in cold warm; do
    WORKER_CN=$S/base-controlnet worker_bg "cn-$start" "$O/cn-worker-$start.log" --lora-dir "$S/loras"
    ready=$(ready_wait $pid 9187) || { echo "worker ($start) did not get ready"; tail -20 "$O/cn-worker-$start.log"; return 1; }
    echo "== worker with the ControlNet hosted, $start start: ready after $ready s"
    load_lines "$O/cn-worker-$start.log" 12
    sed 's/\x1b\[[0-9;]*m//g' "$O/cn-worker-$start.log" | grep -E "ControlNet bucket captured|no CUDA graph for this ControlNet" | cut -c1-300 | tail -3
    echo "config job, submitted→finished ms, pipeline ms, step ms, VAE ms"
    for cfg in 0c0l 1c1l 3c2l; do
      case $cfg in
        0c0l) args=() ;;
        1c1l) args=(--controlnet "$cn=$O/cond-1024.png:0.8" --lora lora0:0.7) ;;
        3c2l) args=(--controlnet "$cn=$O/cond-1024.png:0.8" --controlnet "$cn=$O/cond-1024.png:0.8"
                    --controlnet "$cn=$O/cond-1024.png:0.8" --lora lora0:0.7 --lora lora1:0.7) ;;
      esac
      for i in $(seq 0 $(( ${CN_JOBS:-3} - 1 ))); do
        id=cn-$start-$cfg-$i-$RANDOM
        /opt/kb/katz submit --base "$name" --prompt "a photograph of an astronaut riding a horse" --size 1024x1024 \
          --steps "${STEPS:-50}" --guidance 7.5 --seed 7 "${args[@]}" --queue "$q" --id "$id" --wait \
          -o "$O/cn-$start-$cfg-$i.png" >/dev/null 2>&1 || { echo "job $id failed"; /opt/kb/katz status "$id" | cut -c1-600; }
        echo "$start $cfg $i $(job_ms "$id")"
      done
    done
    kill -TERM $pid; wait $pid 2>/dev/null
    [[ ${CN_WARM:-1} == 1 ]] || break
  done
  echo "== katz generate 1C/1L, fresh process, warm graph cache"
  local t0=$(date +%s.%N)
  KATZ_CACHE_DIR=$cache KATZ_LOG=info /opt/kb/katz generate --device cuda:0 --bundle "$S/base" \
    --prompt "a photograph of an astronaut riding a horse" --size 1024x1024 --steps "${STEPS:-50}" --guidance 7.5 --seed 7 \
    --controlnet "$S/base-controlnet=$O/cond-1024.png:0.8" --lora "$S/loras/lora0.safetensors:0.7" \
    -o "$O/cn-generate.png" >"$O/cn-generate.log" 2>&1 || tail -20 "$O/cn-generate.log"
  echo "generate: wall $(python3 -c "import time;print(f'{time.time()-$t0:.2f}')") s"
  sed 's/\x1b\[[0-9;]*m//g' "$O/cn-generate.log" | grep -E "pipeline total|per step|ControlNets|pipeline loaded|wrote" | cut -c1-300
  echo "== worker without ControlNets, warm graph cache: ready time and one 0C/0L job"
  worker_bg cn-none "$O/cn-worker-none.log"
  ready=$(ready_wait $pid 9187) && echo "ready after $ready s" || echo "worker (no ControlNets) did not get ready"
  load_lines "$O/cn-worker-none.log" 8
  id=cn-none-$RANDOM
  /opt/kb/katz submit --base "$name" --prompt "a photograph of an astronaut riding a horse" --size 1024x1024 \
    --steps "${STEPS:-50}" --guidance 7.5 --seed 7 --queue "$q" --id "$id" --wait -o "$O/cn-none.png" >/dev/null 2>&1 \
    || { echo "job $id failed"; /opt/kb/katz status "$id" | cut -c1-600; }
  echo "none 0c0l 0 $(job_ms "$id")"
  kill -TERM $pid; wait $pid 2>/dev/null
  rm -f "$O"/cn-*-[1-9].png
  return 0
}

ready() {  # ready time: a cold start, then FAST_RESTARTS warm restarts (two 0C/0L jobs each), then generate
  bench_setup || return 1
  bash tools/device/services-pack.sh start || return 1
  local cache=/tmp/katz-graphs q=katz.jobs.ready$(date +%s) name r pid ready i id t0
  name=$(python3 -c "import json;print(json.load(open('$S/base/bundle.json'))['name'])")
  rm -rf "$cache"
  for r in $(seq 0 "${FAST_RESTARTS:-3}"); do
    worker_bg "ready-$r" "$O/ready-$r.log"
    ready=$(ready_wait $pid 9187) || { echo "worker (start $r) did not get ready"; tail -20 "$O/ready-$r.log"; return 1; }
    echo "== start $r ($( ((r == 0)) && echo cold || echo warm)): ready after $ready s"
    load_lines "$O/ready-$r.log" 8
    for i in 0 1; do
      id=ready-$r-$i-$RANDOM
      /opt/kb/katz submit --base "$name" --prompt "a photograph of an astronaut riding a horse" --size 1024x1024 \
        --steps "${STEPS:-50}" --guidance 7.5 --seed 7 --queue "$q" --id "$id" --wait -o "$O/ready-$r-$i.png" >/dev/null 2>&1 \
        || { echo "job $id failed"; /opt/kb/katz status "$id"; }
      echo "job $r $i (ms: submitted→finished, pipeline, step, VAE) $(job_ms "$id")"
    done
    kill -TERM $pid; wait $pid 2>/dev/null
  done
  if [[ ${FAST_PROFILE:-0} == 1 ]]; then  # one more warm start under ONNX Runtime's profiler: where the load's first runs go
    rm -rf "$O/prof"; mkdir -p "$O/prof"
    KATZ_ORT_PROFILE=$O/prof/p worker_bg ready-prof "$O/ready-prof.log"
    ready=$(ready_wait $pid 9187) && echo "== profiled warm start: ready after $ready s" || { echo "profiled start did not get ready"; tail -5 "$O/ready-prof.log"; }
    kill -TERM $pid; wait $pid 2>/dev/null
    for g in unet_encoder unet_decoder vae_decoder text_encoder_2; do
      compgen -G "$O/prof/p-${g}_*.json" >/dev/null || continue
      echo "-- first runs of $g"; python3 tools/ort_profile_summary.py --first "$O"/prof/p-${g}_*.json 2>&1 | head -24
    done
  fi
  echo "same job over the starts: $(sha256sum "$O"/ready-*.png | awk '{print $1}' | sort -u | wc -l) distinct PNG(s)"
  echo "== katz generate 0C/0L, fresh process, warm graph cache"
  t0=$(date +%s.%N)
  KATZ_CACHE_DIR=$cache KATZ_LOG=info /opt/kb/katz generate --device cuda:0 --bundle "$S/base" --prompt "a photograph of an astronaut riding a horse" \
    --size 1024x1024 --steps "${STEPS:-50}" --guidance 7.5 --seed 7 -o "$O/generate.png" ${FAST_GENERATE_ARGS:-} >"$O/generate.log" 2>&1 || tail -20 "$O/generate.log"
  echo "generate: wall $(python3 -c "import time;print(f'{time.time()-$t0:.2f}')") s"
  sed 's/\x1b\[[0-9;]*m//g' "$O/generate.log" | grep -E "weights on the GPU|ran once|bound and captured|pipeline total|per step|VAE|pipeline loaded|wrote" | cut -c1-300
  rm -f "$O"/ready-*-1.png
  return 0
}

vae() {  # the VAE decoder alone: precision and speed against fp32 and eager diffusers, same sitting
  setup
  export_wait || return 1
  local gpu day
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-'); day=$(date +%F)
  echo "== VAE decoder: $(grep -o '"vae_precision": "[^"]*"' "$S/base/bundle.json"), katz vs fp32 vs diffusers (GPU 0)"
  CUDA_VISIBLE_DEVICES=0 python3 tools/vae_check.py --bundle "$S/base" --katz /opt/kb/katz --device cuda:0 \
    --sizes "${VAE_SIZES:-1024,2048}" --repeat "${VAE_REPEAT:-10}" --work /tmp/vae-check \
    --out "$O/vae-$gpu-$day.json" 2>&1 | grep -vE "Warning|warn\(|TracerWarning|should be kept in float32|^ +(if|assert|2 if) " | tail -40
}

determinism() {  # the same job twice on the fp16 SDXL bundle: deterministic graphs vs the fused GroupNorm
  setup
  export_wait || return 1
  KATZ_TEST_DEVICE=cuda:0 KATZ_GPU_BUNDLE=$S/base KATZ_GPU_STEPS=${DET_STEPS:-10} /opt/kb/gpu --ignored --exact \
    an_fp16_bundle_repeats_itself_with_its_deterministic_graphs --nocapture 2>&1 \
    | grep -E "^test |test result|panicked|identical|DIFFERENT|differ|rror" | head -20
}

peer() {  # the compiled peer and the LoRA merge kernels, GPU 0 (see the header)
  bench_setup || return 1
  echo "== diffusers UNet step, eager and under torch.compile (${PEER_MODES:-reduce-overhead}), GPU 0"
  CUDA_VISIBLE_DEVICES=0 python3 tools/bench_diffusers.py --size "${SIZE:-1024}" --steps "${STEPS:-50}" \
    --configs none --compile "${PEER_MODES:-reduce-overhead}" --lora-dir "$S/loras" --out "$BASE" 2>&1 \
    | grep -vE "Warning|warn\(|LoRA keys|float32" | tail -8
  KATZ_GRAPH_CACHE=none katz_bench 1gpu-graph --configs 0C/0L --static-shapes --cuda-graph
  local k
  for k in ${MERGE_KERNELS:-tiled mma mma-f16}; do
    echo "== LoRA merge, 2 × rank 64 over the SDXL bundle, fp16 weights, kernel $k"
    /opt/kb/katz bench lora-merge --device cuda:0 --bundle "$S/base" --dtype f16 --kernel "$k" \
      --lora "$S/loras/lora0.safetensors:0.8" --lora "$S/loras/lora1.safetensors:-0.6" \
      --out "$O/lora-merge-$k-$gpu-$day.json" 2>&1 | grep -v " WARN " | tail -6
  done
}

knobs() {  # the graphed 0C/0L UNet step under CUDA-provider option sets, GPU 0 (see the header)
  bench_setup || return 1
  local set name
  while read -r set; do
    [[ -z $set ]] && continue
    name=$(echo "$set" | tr ',=' '+-')
    echo "== CUDA provider options: ${set}"
    KATZ_CUDA_OPTIONS=${set#-} KATZ_GRAPH_CACHE=none katz_bench "knob-$name" --configs 0C/0L --static-shapes --cuda-graph
  done < <(echo "${KNOBS:--;prefer_nhwc=1;fuse_conv_bias=1}" | tr ';' '\n')
}

fp8_unfused() {  # $S/base-unfused: the SDXL bundle (hard links) with its fp8 graphs rewritten --no-fuse
  local u=$S/base-unfused
  [[ -f $u/bundle.json ]] && return 0
  rm -rf "$u" && cp -al "$S/base" "$u" || return 1
  # the files the rewrite writes must not be links into the bundle it came from
  rm -f "$u"/bundle.json "$u"/unet_*.fp8.onnx* && cp "$S/base/bundle.json" "$u/" || return 1
  python3 tools/fp8_rewrite.py --no-fuse "$u" | tail -2
}

same_jobs() {  # name, variant, loops, jobs: each job from $S/base and $S/<variant> (katz generate on the CUDA-graph
  # and/or bound loop; job 0 plain, 1 with a LoRA, 2 with the bundle's ControlNet, $S/base-controlnet<suffix>),
  # then relative difference and SSIM of each pair → $O/<name>-deviation.json
  local name=$1 v=$2 g i b extra
  for g in $3; do
    for i in $4; do
      for b in base "$v"; do
        extra=()
        (( i == 1 )) && extra=(--lora "$S/loras/lora0.safetensors:1.0")
        (( i == 2 )) && extra=(--controlnet "$S/${b/base/base-controlnet}=bundles/examples/edges-128.png")
        /opt/kb/katz generate --device cuda:0 --bundle "$S/$b" --prompt "a red cube on a blue sphere, $i" --seed "$i" \
          --size "${SIZE:-1024}x${SIZE:-1024}" --steps "${STEPS:-50}" "${extra[@]}" $([[ $g == bound ]] && echo --cuda-graph false) \
          --output "$O/$name-$g-$i-$b.png" 2>&1 | grep -vE " WARN |^\s*$" | tail -1
      done
    done
  done
  python3 - "$O" "$name" "$v" <<'EOF2'
import json, os, sys
sys.path.insert(0, "tools")
from quality_report import read, rel_diff, ssim
o, name, v = sys.argv[1:4]
rows = []
for g in ("graph", "bound"):
    for i in range(3):
        if not os.path.exists(f"{o}/{name}-{g}-{i}-{v}.png"):
            continue
        a, b = read(f"{o}/{name}-{g}-{i}-base.png"), read(f"{o}/{name}-{g}-{i}-{v}.png")
        rows.append({"path": g, "job": i, "loras": int(i == 1), "controlnets": int(i == 2),
                     "rel_diff": rel_diff(b, a), "ssim": ssim(b, a)})
        print(f"  {g}, job {i}: {v} vs base relative difference {rows[-1]['rel_diff']:.5f}, SSIM {rows[-1]['ssim']:.5f}")
json.dump(rows, open(f"{o}/{name}-deviation.json", "w"), indent=1)
EOF2
}

prelude_bundle() {  # $S/base-prelude: the SDXL bundle (hard links) with its UNet pair hoisted, fp8 graphs made again
  local u=$S/base-prelude
  [[ -f $u/unet_prelude.onnx ]] && return 0
  if grep -q '"prelude"' "$S/base/bundle.json"; then echo "the SDXL bundle has its prelude (export it with EXPORT_ARGS=--no-prelude to compare)"; return 1; fi
  rm -rf "$u" && cp -al "$S/base" "$u" || return 1
  # the files the hoist and the rewrite write must not be links into the bundle they came from
  rm -f "$u"/bundle.json "$u"/unet_encoder.onnx* "$u"/unet_decoder.onnx* "$u"/unet_*.fp8.onnx* || return 1
  cp "$S/base/bundle.json" "$S"/base/unet_encoder.onnx* "$S"/base/unet_decoder.onnx* "$u/" || return 1
  local t0=$(date +%s)
  python3 tools/job_prelude.py "$u" || return 1
  [[ -f $u/fp8_amax.json ]] && { python3 tools/fp8_rewrite.py "$u" | tail -2; }
  echo "hoisted in $(( $(date +%s) - t0 )) s"
}

prelude() {  # the UNet prelude against the whole pair, GPU 0 (see the header)
  bench_setup || return 1
  prelude_bundle || return 1
  local loras p b
  loras=$(ls "$S"/loras/lora[01].safetensors | paste -sd,)
  for p in ${PRELUDE_PRECISIONS:-bundle fp8}; do
    for b in base base-prelude; do
      BENCH_BUNDLE=$S/$b BENCH_LORAS=$loras KATZ_GRAPH_CACHE=none \
        katz_bench "1gpu-graph-$p-$b" --configs "${PRELUDE_CONFIGS:-0C/0L}" --static-shapes --cuda-graph --precision "$p"
    done
  done
  echo "== the same jobs from both bundles (katz generate, ${SIZE:-1024}², ${STEPS:-50} steps; a LoRA switches the weights)"
  same_jobs prelude base-prelude "graph bound" "${PRELUDE_JOBS:-0 1}"
}

rewritten() {  # $2: bundle $1 (hard links) with its step graphs rewritten (tools/step_rewrite.py)
  local src=$1 u=$2 g
  [[ -f $u/.rewritten ]] && return 0
  rm -rf "$u" && cp -al "$src" "$u" || return 1
  # the graph files the rewrite writes must not be links into the bundle they came from (their
  # external data files stay links: the rewrite leaves them as they are)
  for g in "$u"/*.onnx; do cp --remove-destination "$src/$(basename "$g")" "$g" || return 1; done
  python3 tools/step_rewrite.py "$u" && touch "$u/.rewritten"
}

rewrite() {  # the step rewrite against ONNX Runtime's graphs, GPU 0 (see the header)
  bench_setup || return 1
  rewritten "$S/base" "$S/base-rewrite" && rewritten "$S/base-controlnet" "$S/base-controlnet-rewrite" || return 1
  local loras p b
  loras=$(ls "$S"/loras/lora[01].safetensors | paste -sd,)
  for p in ${REWRITE_PRECISIONS:-bundle fp8}; do
    for b in base base-rewrite; do
      BENCH_BUNDLE=$S/$b BENCH_CN=$S/${b/base/base-controlnet} BENCH_LORAS=$loras KATZ_GRAPH_CACHE=none \
        katz_bench "1gpu-graph-$p-$b" --configs "${REWRITE_CONFIGS:-0C/0L,1C/1L}" --static-shapes --cuda-graph --precision "$p"
    done
  done
  echo "== the same jobs from both (katz generate, ${SIZE:-1024}², ${STEPS:-50} steps; job 1 with a LoRA, job 2 with a ControlNet)"
  same_jobs rewrite base-rewrite "${REWRITE_PATHS:-graph bound}" "${REWRITE_JOBS:-0 1 2}"
}

fp8() {  # fp8 GEMMs against fp16 in one sitting, GPU 0 (see the header)
  bench_setup || return 1
  local p loras
  loras=$(ls "$S"/loras/lora[01].safetensors | paste -sd,)  # the export's own LoRA (lora0); peer or bench add lora1
  for p in bundle fp8; do
    BENCH_LORAS=$loras KATZ_GRAPH_CACHE=none \
      katz_bench "1gpu-graph-$p" --configs "${FP8_CONFIGS:-0C/0L,1C/1L}" --static-shapes --cuda-graph --precision "$p"
  done
  if [[ ${FP8_UNFUSED:-0} == 1 ]] && fp8_unfused; then  # every quantize a kernel of its own, for comparison
    BENCH_BUNDLE=$S/base-unfused BENCH_LORAS=$loras KATZ_GRAPH_CACHE=none \
      katz_bench "1gpu-graph-fp8-unfused" --configs "${FP8_CONFIGS:-0C/0L,1C/1L}" --static-shapes --cuda-graph --precision fp8
  fi
  echo "== the same jobs in fp16 and fp8: image deviation (katz generate, ${SIZE:-1024}², ${STEPS:-50} steps)"
  local i l
  for i in 0 1; do
    l=(); (( i == 1 )) && l=(--lora "$S/loras/lora0.safetensors:1.0")
    for p in bundle fp8; do
      /opt/kb/katz generate --device cuda:0 --bundle "$S/base" --prompt "a red cube on a blue sphere, $i" --seed "$i" \
        --size "${SIZE:-1024}x${SIZE:-1024}" --steps "${STEPS:-50}" --precision "$p" "${l[@]}" --output "$O/fp8-$i-$p.png" \
        2>&1 | grep -vE " WARN |^\s*$" | tail -2
    done
  done
  python3 - "$O" <<'EOF'
import json, sys
sys.path.insert(0, "tools")
from quality_report import read, rel_diff, ssim
o = sys.argv[1]
rows = []
for i in range(2):
    a, b = read(f"{o}/fp8-{i}-bundle.png"), read(f"{o}/fp8-{i}-fp8.png")
    rows.append({"job": i, "loras": i, "rel_diff": rel_diff(b, a), "ssim": ssim(b, a)})
    print(f"  job {i} ({rows[-1]['loras']} LoRAs): fp8 vs fp16 relative difference {rows[-1]['rel_diff']:.4f}, SSIM {rows[-1]['ssim']:.4f}")
json.dump(rows, open(f"{o}/fp8-deviation.json", "w"), indent=1)
EOF
  echo "== fp8 against fp16 across LoRA switches, with and without CUDA graphs (tests/gpu.rs)"
  KATZ_TEST_DEVICE=cuda:0 KATZ_GPU_BUNDLE=$S/base KATZ_GPU_LORA=$S/loras/lora0.safetensors /opt/kb/gpu --ignored \
    --exact fp8_graphs_follow_the_fp16_image_and_every_lora_switch --nocapture 2>&1 \
    | grep -E "^test |test result|panicked|relative|rror" | head -12
}

ncu_step() {  # one UNet step's kernels under Nsight Compute, GPU 0 (see the header)
  bench_setup || return 1
  KATZ_GRAPH_CACHE=none timeout "${NCU_TIMEOUT_S:-280}" /usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --csv \
    --print-units base --launch-count "${NCU_KERNELS:-8000}" --log-file "$O/ncu.csv" /opt/kb/katz bench pipeline \
    --device cuda:0 --bundle "${BENCH_BUNDLE:-$S/base}" --configs 0C/0L --size "${SIZE:-1024}" --steps 3 --repeat 1 --static-shapes \
    >"$O/ncu-bench.log" 2>&1
  gzip -f "$O/ncu.csv" && python3 tools/ncu_step_summary.py "$O/ncu.csv.gz"
  [[ -n ${OUT:-} ]] && cp "$O/ncu.csv.gz" "$OUT/ncu${NCU_TAG:-}.csv.gz"
}

results() {  # $OUT takes at most 8 files: the run's results travel as one tarball
  [[ -n ${OUT:-} && -d ${OUT:-} ]] || return 0
  local f=$(cd "$O" && ls -d *.json *.svg *.md *.txt *.log 2>/dev/null)
  [[ -n $f ]] && tar -C "$O" -czf "$OUT/gpu-path.tar.gz" $f
  return 0
}
trap results EXIT

case ${1:-all} in
  stage) stage ;;
  tests) tests ;;
  export) stage; export_wait ;;
  bench) bench ;;
  multi) bench_multi ;;
  profile) profile ;;
  workload) workload ;;
  servicebench) servicebench ;;
  service) service ;;
  baseline) baseline ;;
  split) split ;;
  quality) quality ;;
  graphs) graphs ;;
  placement) placement ;;
  eight) eight ;;
  fastpath) fastpath ;;
  ready) ready ;;
  cnpath) cnpath ;;
  vae) vae ;;
  determinism) determinism ;;
  knobs) knobs ;;
  peer) peer ;;
  ncu) ncu_step ;;
  fp8) fp8 ;;
  prelude) prelude ;;
  rewrite) rewrite ;;
  all) tests; bench; bench_multi ;;
  *) echo "usage: $0 stage|tests|export|bench|baseline|peer|ncu|rewrite|prelude|fp8|knobs|multi|split|service|servicebench|profile|workload|quality|graphs|placement|eight|fastpath|ready|cnpath|vae|determinism|all"; exit 2 ;;
esac
