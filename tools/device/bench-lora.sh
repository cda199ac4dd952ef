#!/usr/bin/env bash
# LoRA merge on the GPU machine: katz's one-launch GPU merge (`katz bench lora-merge`)
# against diffusers' load_lora_weights + fuse_lora (tools/bench_lora_merge.py), same GPU, same run.
#
#   1. katz-kernels' GPU tests (the merge kernels against an f64 reference), when carried
#   2. tools/bench_lora_merge.py: full-size SDXL in fp16 with seeded random weights, LoRA files of
#      rank 64 and 128 on the attention + feed-forward layers, shapes.json, diffusers' timings
#   3. katz bench lora-merge --shapes shapes.json for each rank × {1, 2} LoRAs × {f16, f32} ×
#      {tiled, mma} kernels, plus the naive kernel for comparison
#   4. one JSON with everything ($OUT/lora-merge-<GPU>.json) and a summary table
#
# Here (the carry dir C, default .gpu-carry, must be ignored by git):
#   cargo build --release && mkdir -p $C/katz $C/kt $C/w
#   strip -o $C/katz/katz target/release/katz
#   cargo test --release -p katz-kernels --no-run   # strip the printed binary into $C/kt/kernels
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d $C/w diffusers==0.42.1 importlib_metadata
# There (carry $C): bash tools/device/bench-lora.sh
#   env: KATZ_CARRY=$C, KATZ_TOOLS (directory of the python tools, default tools), OUT, RANKS (64 128)
# A dry run of the same logic on a CPU host (tiny architecture, the katz CPU path):
#   KATZ_CARRY=target/release/.. PYTHON=.venv-tools/bin/python BENCH_PY_ARGS="--config tiny --device cpu"
#   KATZ_BENCH_DEVICE=cpu KATZ_BENCH_WEIGHTS="--bundle bundles/tiny-sdxl" DTYPES=f32 RANKS="4 8" bash tools/device/bench-lora.sh
set -uo pipefail
C=${KATZ_CARRY:-.gpu-carry}
T=${KATZ_TOOLS:-tools}
O=${OUT:-/tmp/bench-lora-out}
W=${KATZ_BENCH_WORK:-/tmp/lora-bench}
RANKS=${RANKS:-64 128}
DTYPES=${DTYPES:-f16 f32}
PY=${PYTHON:-python3}
DEV=${KATZ_BENCH_DEVICE:-cuda:0}
KATZ=${KATZ_BIN:-$C/katz/katz}
mkdir -p "$O" "$W"

main() {
export PYTHONUNBUFFERED=1
if compgen -G "$C/w/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$C"/w/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
NV=$($PY -c "import nvidia;print(list(nvidia.__path__)[0])" 2>/dev/null || true)
# cudarc opens libnvrtc (the python nvidia packages' copy) and libcuda (the driver's) at run time
if [[ -n $NV ]]; then
  export LD_LIBRARY_PATH=$(ls -d "$NV"/*/lib | paste -sd:):/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  echo "NVRTC: $(ls "$NV"/*/lib/libnvrtc.so* 2>/dev/null | head -3 | tr '\n' ' ')"
fi
if command -v nvidia-smi >/dev/null; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
else
  gpu=cpu
fi

if [[ -x $C/kt/kernels ]]; then
  echo "== katz-kernels GPU tests (all output: $O/kernel-tests.log)"
  "$C"/kt/kernels --include-ignored --test-threads 1 --nocapture > "$O/kernel-tests.log" 2>&1
  grep -E "^test .*(ok|FAILED)$|test result|panicked" -A1 "$O/kernel-tests.log" | grep -v "^--" || true
fi

echo "== diffusers (fp16): load_lora_weights + fuse_lora"
t0=$(date +%s)
# shellcheck disable=SC2086  # BENCH_PY_ARGS is several words
$PY "$T"/bench_lora_merge.py --work "$W" --out "$O/diffusers.json" --ranks "${RANKS// /,}" ${BENCH_PY_ARGS:-} ||
  echo "diffusers side failed (katz still runs on whatever LoRA files it wrote)"
[[ -f $W/shapes.json ]] || { echo "no $W/shapes.json: nothing to merge"; exit 1; }
echo "diffusers side: $(( $(date +%s) - t0 )) s"

# DROP_CACHES=1: every katz run reads its LoRA files from disk; by default they are in the page
# cache, as they were for diffusers (written, then read by its runs just before)
drop_caches() {
  if [[ ${DROP_CACHES:-0} == 1 ]]; then sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo dropped || echo warm
  else echo warm; fi
}
echo "== katz bench lora-merge"
runs=()
bench() { # dtype rank n kernel repeat
  local dtype=$1 r=$2 n=$3 kernel=$4 repeat=$5 loras=() f
  for ((i = 0; i < n; i++)); do loras+=(--lora "$W/lora-r$r-$i.safetensors:0.8"); done
  f=$W/katz-$dtype-r$r-n$n-$kernel.json
  local pc; pc=$(drop_caches)
  # shellcheck disable=SC2086  # KATZ_BENCH_WEIGHTS is two words
  if "$KATZ" bench lora-merge ${KATZ_BENCH_WEIGHTS:---shapes $W/shapes.json} "${loras[@]}" --device "$DEV" \
      --dtype "$dtype" --kernel "$kernel" --repeat "$repeat" --out "$f"; then
    $PY -c "import json,sys; d=json.load(open(sys.argv[1])); d['page_cache']=sys.argv[2]; json.dump(d,open(sys.argv[1],'w'),indent=1)" "$f" "$pc"
    runs+=("$f")
  else
    echo "katz bench failed: $dtype rank $r × $n ($kernel)"
  fi
}
for dtype in $DTYPES; do
  for r in $RANKS; do
    for n in 1 2; do
      for kernel in ${KERNELS:-tiled mma}; do bench "$dtype" "$r" $n "$kernel" 10; done
    done
  done
done
r0=${RANKS%% *}
for dtype in $DTYPES; do bench "$dtype" "$r0" 1 naive 5; done

echo "== summary"
$PY - "$O/diffusers.json" "$O/lora-merge-${gpu// /-}.json" "$gpu" "${runs[@]}" <<'EOF'
import json, sys
dif_path, out_path, gpu, *runs = sys.argv[1:]
import os
dif = json.load(open(dif_path)) if os.path.exists(dif_path) else {"runs": [], "layers": "?", "parameters": float("nan")}
katz = [json.load(open(p)) for p in runs]
by = {(r["rank"], r["loras"]): r for r in dif["runs"]}
rows = []
print(f"LoRA merge on {gpu}: {dif['layers']} attention + feed-forward layers, {dif['parameters'] / 1e9:.2f} G parameters")
print(f"{'rank':>4} {'LoRAs':>5} {'dtype':>5} {'kernel':>6} | {'parse':>8} {'upload':>8} {'pinned':>7} {'merge':>8} {'min':>8} "
      f"{'cold':>8} | {'floor':>7} {'×floor':>6} {'TFLOP/s':>7} | {'diffusers':>9} {'fuse':>7} | {'diff/katz':>9}")
def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else format("—", ">" + spec.split(".")[0].lstrip(">"))
for k in katz:
    t = k["timings_ms"]
    rank = max(k["ranks"])
    n = len(k["loras"])
    d = by.get((rank, n))
    ratio = d["load_fuse_ms"] / t["total_cold"] if d else None
    row = {"rank": rank, "loras": n, "dtype": k["dtype"], "kernel": k["kernel"], **t,
           **{key: k.get(key) for key in ("floor_ms", "merge_over_floor", "merge_tflop_s", "bandwidth_gb_s",
                                          "spot_check_rel_err", "page_cache")},
           "diffusers_load_fuse_ms": d and d["load_fuse_ms"], "diffusers_fuse_ms": d and d["fuse_ms"],
           "diffusers_over_katz_cold": ratio and round(ratio, 2)}
    rows.append(row)
    print(f"{rank:>4} {n:>5} {k['dtype']:>5} {k['kernel']:>6} | {fmt(t['parse_host'], '>8.1f')} "
          f"{fmt(t.get('upload_factors_h2d'), '>8.1f')} {fmt(t.get('upload_factors_h2d_pinned'), '>7.1f')} {fmt(t['merge_median'], '>8.2f')} {fmt(t['merge_min'], '>8.2f')} "
          f"{fmt(t['total_cold'], '>8.1f')} | {fmt(k.get('floor_ms'), '>7.2f')} {fmt(k.get('merge_over_floor'), '>6.2f')} "
          f"{fmt(k.get('merge_tflop_s'), '>7.1f')} | {fmt(d and d['load_fuse_ms'], '>9.1f')} "
          f"{fmt(d and d['fuse_ms'], '>7.1f')} | {fmt(ratio, '>9.1f')}")
print("ms; cold = parse + upload + merge (median); floor = (W read + out written + factors read) / dtod bandwidth "
      f"({katz[0]['bandwidth_gb_s'] if katz else '?'} GB/s); diffusers = load_lora_weights + fuse_lora, fp16, median")
json.dump({"bench": "lora-merge", "machine": gpu, "summary": rows, "diffusers": dif, "katz": katz},
          open(out_path, "w"), indent=1)
print(f"wrote {out_path}")
EOF
}

main 2>&1 | tee -a "$O/bench-lora.log"
