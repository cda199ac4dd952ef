#!/usr/bin/env bash
# The workload runs on this machine: a trace drawn from the Katz statistics (service
# B) replayed at several rates into real workers (tiny bundles, CPU), for each configuration, then
# `katz report` over all of them, and `katz trace cache` for the cache comparison with the paper.
#
#   tools/workload-run.sh [OUT]        (default docs/workload/<date>-<cores>cpu)
#
# Configurations (CONFIGS):
#   sync-serial     LoRAs merged before the first step, ControlNets in the worker, serially
#   async-serial    LoRAs switched in at the bound step (20%), ControlNets serially
#   async-service   async LoRAs, ControlNets through a `katz controlnet-worker` (RabbitMQ + Redis)
# env: RATES (jobs/s, "1 2 4 6 8"), JOBS per run (60), STEPS (20), WORKERS (2), CONFIGS, SEED (7)
# Needs RabbitMQ and Redis (tools/services.sh starts them) and the release build (make build).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
RATES=${RATES:-"1 2 4 6 8"} JOBS=${JOBS:-60} STEPS=${STEPS:-20} WORKERS=${WORKERS:-2} SEED=${SEED:-7}
CONFIGS=${CONFIGS:-"sync-serial async-serial async-service"}
out=${1:-docs/workload/$(date +%F)-$(nproc)cpu}
make -s build >/dev/null
tools/services.sh >/dev/null
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$root/.katz/ort/libonnxruntime.so.1.31.1} KATZ_LOG=${KATZ_LOG:-warn}
katz=$root/target/release/katz
run=$(date +%s)
tmp=$(mktemp -d /tmp/katz-workload-XXXX)
store=$tmp/store
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop; rm -rf "$tmp"' EXIT
mkdir -p "$out"
configs=()

wait_done() {  # prefix, count, timeout s
  local prefix=$1 n=$2 t0=$SECONDS left
  while (( SECONDS - t0 < $3 )); do
    left=0
    for i in $(seq 0 $((n - 1))); do
      case $(redis-cli --raw HGET "katz:job:$prefix-$i" status) in done|failed|cancelled|expired) ;; *) left=$((left + 1)) ;; esac
    done
    (( left == 0 )) && return 0
    sleep 1
  done
  echo "  $left jobs of $prefix not finished after $3 s" >&2
}

for cfg in $CONFIGS; do
  for rate in $RATES; do
    tag=$cfg-${rate/./p}
    prefix=wl$run-$tag queue=katz.jobs.wl$run.$tag cq=katz.controlnet.wl$run.$tag
    trace=$tmp/trace-$rate.json
    [[ -f $trace ]] || "$katz" trace gen --service B --requests "$JOBS" --rate "$rate" --seed "$SEED" --out "$trace" >/dev/null
    mode=${cfg%%-*} cn=${cfg#*-}
    extra=(--lora-mode "$mode" --controlnet-mode serial)
    if [[ $cn == service ]]; then
      "$katz" controlnet-worker --bundle bundles/tiny-sdxl-controlnet --queue "$cq" --concurrency 3 --threads 1 \
        --name "wl-cn-$tag" >"$tmp/cn-$tag.log" 2>&1 &
      pids+=($!)
      extra=(--lora-mode "$mode" --controlnet-service "tiny-sdxl-controlnet@$cq")
    fi
    for w in $(seq 1 "$WORKERS"); do
      "$katz" worker --queue "$queue" --name "wl-$tag-$w" --threads 1 --lora-dir "$store" "${extra[@]}" \
        >"$tmp/w-$tag-$w.log" 2>&1 &
      pids+=($!)
    done
    sleep 3  # the workers load the tiny bundles
    t0=$SECONDS
    "$katz" trace replay "$trace" --store "$store" --speed 1 --queue "$queue" --id-prefix "$prefix" \
      --steps "$STEPS" | tail -1
    wait_done "$prefix" "$JOBS" 600
    echo "== $cfg at $rate jobs/s: $JOBS jobs in $((SECONDS - t0)) s"
    stop
    configs+=(--config "$cfg@$rate=$prefix")
  done
done

"$katz" report "${configs[@]}" --out "$out"
"$katz" trace gen --service B --requests 50000 --rate 1 --seed 2025 --out "$tmp/b50k.json" >/dev/null
"$katz" trace cache "$tmp/b50k.json" --out "$out/cache-serviceB-50k.json" | tee "$out/cache-serviceB-50k.txt"
{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%FT%TZ)"
  echo "JOBS=$JOBS STEPS=$STEPS WORKERS=$WORKERS RATES='$RATES' CONFIGS='$CONFIGS' SEED=$SEED (tools/workload-run.sh)"
} >"$out/run.txt"
echo "wrote $out"
