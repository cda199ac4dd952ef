#!/usr/bin/env python3
"""Summarises ONNX Runtime profiles (KATZ_ORT_PROFILE=PREFIX katz …): time by operator type, per
graph, over all runs after the first (the first pays kernel selection); and, on a GPU, the nodes
that ran on another provider than CUDA (CPU-placed nodes and the Memcpy they bring, which keep
ONNX Runtime from capturing a CUDA graph).

    python3 tools/ort_profile_summary.py PREFIX-unet_encoder_*.json [...]
    python3 tools/ort_profile_summary.py --first PREFIX-*.json   the first run instead: what a load pays
"""
import collections
import json
import sys


def first_run(path, events, runs):
    """The session's own events (initialisation), every run's length, and the first run by operator
    and by node: where the first run's time goes beyond the kernels' (kernel selection, allocation)."""
    for e in events:
        if e.get("cat") == "Session" and e.get("name") != "model_run":
            print(f"  {e['name']:<28}{e['dur'] / 1e3:>9.1f} ms")
    lengths = ", ".join(f"{r['dur'] / 1e3:.1f}" for r in runs)
    print(f"{path}: runs (ms): {lengths}")
    if not runs:
        return
    r0 = runs[0]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and r0["ts"] <= e["ts"] <= r0["ts"] + r0["dur"]]
    by_op = collections.Counter()
    for e in nodes:
        by_op[e["args"].get("op_name", "?")] += e["dur"]
    print(f"  first run: nodes {sum(by_op.values()) / 1e3:.1f} ms of {r0['dur'] / 1e3:.1f} ms")
    for op, us in by_op.most_common(8):
        print(f"    {op:<28}{us / 1e3:>9.1f} ms")
    for e in sorted(nodes, key=lambda e: -e["dur"])[:6]:
        print(f"    node {e['name'][: -len('_kernel_time')][:60]:<62}{e['dur'] / 1e3:>8.1f} ms")


args = sys.argv[1:]
first = bool(args) and args[0] == "--first"
for path in args[first:]:
    events = json.load(open(path))
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if first:
        first_run(path, events, runs)
        continue
    first_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_end:
            by_op[e["args"].get("op_name", "?")] += e["dur"]
    n = max(len(runs) - 1, 1)
    total = sum(by_op.values())
    run_ms = sum(r["dur"] for r in runs[1:]) / n / 1e3 if len(runs) > 1 else 0
    print(f"{path}: {len(runs)} runs; after the first: {run_ms:.1f} ms per run, kernels {total / n / 1e3:.1f} ms per run")
    for op, us in by_op.most_common(12):
        print(f"  {op:<28}{us / n / 1e3:>9.2f} ms per run  {100 * us / max(total, 1):5.1f}%")
    providers = collections.Counter()
    off_gpu = collections.Counter()
    last = runs[-1]["ts"] if runs else 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last:
            prov = e["args"].get("provider", "?")
            providers[prov] += 1
            if prov != "CUDAExecutionProvider":
                off_gpu[(prov, e["args"].get("op_name", "?"), e["name"][: -len("_kernel_time")])] += 1
    print(f"  nodes per provider (last run): {dict(providers)}")
    if "CUDAExecutionProvider" in providers:
        for (prov, op, name), k in sorted(off_gpu.items())[:20]:
            print(f"    not on CUDA: {op:<16} {prov:<24} {name}")
