#!/usr/bin/env python3
"""Where a UNet step's GPU time goes, from Nsight Compute: `ncu --metrics gpu__time_duration.sum
--csv --log-file F katz bench pipeline --static-shapes --steps 3 …` (gpu-path.sh ncu) times every
kernel of the run; this finds the repeating UNet step (encoder + decoder: a run of cuDNN
attention kernels per session) and sums one step's kernels by family.

    python3 tools/ncu_step_summary.py ncu.csv[.gz] [--step N]

ncu serialises the kernels, locks the clocks to base and flushes the caches before each one, so
the sum is above the graphed step's wall time; the shares are what to act on.
"""
import argparse
import collections
import csv
import gzip
import sys


def family(n):
    if "sdpa" in n or "fmha" in n or "flash" in n:
        return "attention (cuDNN flash)"
    if "fprop" in n or ("conv" in n.lower() and "convert" not in n.lower()):
        return "convolution (cuDNN implicit GEMM)"
    if "nvjet" in n or "gemm" in n.lower() or "cutlass" in n or "splitK" in n:
        return "GEMM (cuBLASLt)"
    if "fp8_quantize" in n or "fp8_amax" in n:
        return "fp8 quantize (katz)"
    if "LayerNorm" in n or n.startswith("layer_norm_f16"):  # ONNX Runtime's, katz's (step rewrite)
        return "LayerNorm (+skip)"
    if "GroupNorm" in n:
        return "GroupNorm (+skip, SiLU)"
    if "Gelu" in n or n.startswith("geglu_f16"):
        return "BiasSplitGelu"
    if "ranspose" in n:
        return "Transpose"
    if "Cast" in n:
        return "Cast"
    return "other elementwise"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--step", type=int, default=-1, help="which complete step (default: the last)")
    a = ap.parse_args()
    opener = gzip.open if a.csv.endswith(".gz") else open
    with opener(a.csv, "rt") as f:
        rows = [r for r in csv.reader(f) if len(r) > 10]
    head, rows = rows[0], rows[1:]
    ni, vi = head.index("Kernel Name"), head.index("Metric Value")
    names = [r[ni] for r in rows]
    ns = [float(r[vi].replace(",", "")) for r in rows]
    # the attention kernels come in clusters, one per session run: encoder runs (two clusters,
    # split by the mid block) and decoder runs alternate; a step starts where an encoder's first
    # attention cluster starts, minus the kernels before it in the encoder (taken as the period)
    att = [i for i, n in enumerate(names) if family(n).startswith("attention")]
    if not att:
        sys.exit("no attention kernels: not a UNet run")
    clusters = [[att[0]]]
    for i in att[1:]:
        (clusters[-1].append(i) if i - clusters[-1][-1] <= 60 else clusters.append([i]))
    sizes = [len(c) for c in clusters]
    # a step: the cluster sizes repeat with a period of 3 (encoder down, encoder mid/up, decoder),
    # or of 1 where nothing long parts them (a UNet prelude took the text K/V GEMMs out of the step)
    starts = []
    for period in (3, 1):
        starts = [clusters[k][0] for k in range(0, len(clusters) - period, period)
                  if sizes[k:k + period] == sizes[period:2 * period]]
        if len(starts) >= 2:
            break
    if len(starts) < 2:
        sys.exit(f"no repeating step found (attention clusters {sizes})")
    steps = list(zip(starts, starts[1:]))
    a0, a1 = steps[a.step]
    by, count = collections.Counter(), collections.Counter()
    for i in range(a0, a1):
        by[family(names[i])] += ns[i]
        count[family(names[i])] += 1
    total = sum(by.values())
    print(f"one UNet step (batch 2): {a1 - a0} kernels, {total / 1e6:.2f} ms summed under ncu "
          f"({len(steps)} complete steps found; attention clusters {sizes})")
    for k, v in by.most_common():
        print(f"  {k:<36}{v / 1e6:8.2f} ms {100 * v / total:5.1f}%  {count[k]:>4} kernels")
    top = collections.Counter()
    for i in range(a0, a1):
        top[names[i].split("(")[0][:80]] += ns[i]
    print("  heaviest kernels:")
    for k, v in top.most_common(8):
        print(f"    {v / 1e6:7.2f} ms  {k}")


if __name__ == "__main__":
    main()
