#!/usr/bin/env bash
# Live LoRA caches against the simulation: a service B trace over INSTANCES serving
# instances, one `katz worker` per instance on its own queue (`katz trace replay
# --queue-per-instance`) with a host LoRA cache of ENTRIES adapters (LRU, no lookahead, so each
# worker sees its instance's requests in trace order), then the loads per request the workers
# recorded (`katz report`) beside `katz trace cache` on the same trace — and the paper's 0.54.
#
#   tools/workload-cache-run.sh [OUT]   (default docs/workload/<date>-cache-<cores>cpu)
# env: REQUESTS (2000), INSTANCES (4), ENTRIES (10), RATE (jobs/s, 8), STEPS (4: the cache does not
#      depend on them), SEED (11)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
REQUESTS=${REQUESTS:-2000} INSTANCES=${INSTANCES:-4} ENTRIES=${ENTRIES:-10} RATE=${RATE:-8} STEPS=${STEPS:-4}
SEED=${SEED:-11}
out=${1:-docs/workload/$(date +%F)-cache-$(nproc)cpu}
make -s build >/dev/null
tools/services.sh >/dev/null
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$root/.katz/ort/libonnxruntime.so.1.31.1} KATZ_LOG=${KATZ_LOG:-warn}
katz=$root/target/release/katz
run=$(date +%s)
tmp=$(mktemp -d /tmp/katz-cache-run-XXXX)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"' EXIT
mkdir -p "$out"
trace=$tmp/trace.json
"$katz" trace gen --service B --requests "$REQUESTS" --rate "$RATE" --instances "$INSTANCES" --seed "$SEED" --out "$trace"
queue=katz.jobs.cache$run prefix=cache$run
for i in $(seq 1 "$INSTANCES"); do
  "$katz" worker --queue "$queue.10.0.0.$i" --name "cache-$i" --threads 1 --lora-dir "$tmp/store" \
    --lora-cache-entries "$ENTRIES" --lora-cache-policy lru --lookahead 0 >"$tmp/w$i.log" 2>&1 &
  pids+=($!)
done
sleep 3
"$katz" trace replay "$trace" --store "$tmp/store" --lora-rank 2 --speed 1 --queue "$queue" --queue-per-instance \
  --id-prefix "$prefix" --steps "$STEPS" >"$tmp/replay.txt" && tail -1 "$tmp/replay.txt"
t0=$SECONDS
while (( SECONDS - t0 < 900 )); do
  left=$(redis-cli --raw EVAL "local n=0 for i=0,tonumber(ARGV[2])-1 do local s=redis.call('HGET','katz:job:'..ARGV[1]..'-'..i,'status') if s~='done' and s~='failed' then n=n+1 end end return n" 0 "$prefix" "$REQUESTS")
  (( left == 0 )) && break
  sleep 2
done
"$katz" report --config "live-lru-$ENTRIES=$prefix" --out "$out" >"$tmp/report.txt" && sed -n 3p "$tmp/report.txt"
"$katz" trace stats "$trace" --out "$out/trace-stats.json" >"$tmp/stats.txt" && head -6 "$tmp/stats.txt"
"$katz" trace cache "$trace" --max-entries "$ENTRIES" --out "$out/trace-cache.json" >"$tmp/cache.txt" && tail -3 "$tmp/cache.txt"
python3 - "$out" "$ENTRIES" <<'EOF' | tee "$out/summary.txt"
import json, sys
out, e = sys.argv[1], int(sys.argv[2])
live = json.load(open(f"{out}/report.json"))[0]
sim = [r for r in json.load(open(f"{out}/trace-cache.json"))["rows"] if r["entries"] == e][0]["lora_lru"]
print(f"LoRA loads per request, {e}-entry LRU per instance: live workers {live['lora_loads_per_request']:.3f} "
      f"({live['done']} jobs done of {live['jobs']}), katz trace cache {sim['loads_per_request']:.3f}; "
      f"the paper (service B, 10 entries, real trace, one cache per node): 0.54")
EOF
{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%FT%TZ)"
  echo "REQUESTS=$REQUESTS INSTANCES=$INSTANCES ENTRIES=$ENTRIES RATE=$RATE STEPS=$STEPS SEED=$SEED (tools/workload-cache-run.sh)"
} >"$out/run.txt"
echo "wrote $out"
