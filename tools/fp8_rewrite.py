#!/usr/bin/env python3
"""Rewrites a GPU bundle's UNet graphs for fp8 GEMMs: every GEMM against a LoRA-targetable weight
input becomes `katz.Fp8Quantize` → `katz.Fp8MatMul` (the service's CUDA custom ops).

    python tools/fp8_rewrite.py BUNDLE_DIR [--no-fuse]   (needs BUNDLE_DIR/fp8_amax.json: export_bundle.py --gpu --fp8)

    X ─▶ MatMul(X, Transpose(W, perm=[1,0]))              X ─▶ Fp8Quantize(scale) ─▶ X8 (uint8, e4m3fn bits)
    X ─▶ com.microsoft.FusedMatMul(X, W, transB=1)   ⇒    X8, W ─▶ Fp8MatMul(x_scale) ─▶ Y (fp16)
    X ─▶ Gemm(X, W, C, transB=1)                          (Gemm: then Add(Y, C))

W is a float16 graph input [N, K] (PyTorch's out × in); Fp8MatMul quantizes it per tensor itself, so
a LoRA merged into the weight input needs no re-quantization here. The activation scale is
amax / 448, amax the calibrated max |X| of the Linear layer (fp8_amax.json, keyed by weight name);
one Fp8Quantize per activation tensor (the Q, K, V projections share theirs: the largest amax of
its readers). Where that tensor is an output that nothing else reads of a `com.microsoft.BiasSplitGelu`
(the feed-forward's GEGLU) or of a layer norm (`com.microsoft.SkipLayerNormalization`, ONNX
`LayerNormalization`), the two become one `katz.Fp8BiasSplitGelu` or `katz.Fp8LayerNorm`: the
activation quantized as it is made, one pass over it instead of two and half the bytes out. Kept in fp16, and counted: K or N not a multiple of 16 (cuBLASLt's fp8 alignment), no
calibrated amax (or amax ≤ 0), a weight that is not float16, other uses of a weight input.

Writes unet_encoder.fp8.onnx / unet_decoder.fp8.onnx beside the graphs (external data over 2 GB)
and the manifest's `fp8` entry. `rewrite()` is the same rewrite on an in-memory model.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

DOMAIN = "katz"
FP8_MAX = 448.0
ALIGN = 16
GRAPHS = {"unet_encoder": "encoder", "unet_decoder": "decoder"}


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _weight_shape(model) -> dict:
    """name → (elem_type, dims) of the graph inputs (dims None where not static)."""
    out = {}
    for i in model.graph.input:
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out[i.name] = (t.elem_type, dims if None not in dims else None)
    return out


def _match(node, producer: dict, weights: set):
    """(X, W, bias or None, Transpose node or None) where `node` computes X @ Wᵀ (+ bias) against a
    weight input W, else None."""
    ins = list(node.input)
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(ins) == 2:
        t = producer.get(ins[1])
        if (t is not None and t.op_type == "Transpose" and t.input[0] in weights
                and list(_attrs(t).get("perm", [1, 0])) == [1, 0]):
            return ins[0], t.input[0], None, t
    if node.op_type == "FusedMatMul" and node.domain == "com.microsoft" and len(ins) == 2 and ins[1] in weights:
        a = _attrs(node)
        if (a.get("transB", 0) == 1 and a.get("transA", 0) == 0 and a.get("alpha", 1.0) == 1.0
                and a.get("transBatchA", 0) == 0 and a.get("transBatchB", 0) == 0):
            return ins[0], ins[1], None, None
    if node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and len(ins) >= 2 and ins[1] in weights:
        a = _attrs(node)
        if (a.get("transB", 0) == 1 and a.get("transA", 0) == 0 and a.get("alpha", 1.0) == 1.0
                and a.get("beta", 1.0) == 1.0):
            return ins[0], ins[1], (ins[2] if len(ins) > 2 and ins[2] else None), None
    return None


def _uses(node, producer: dict, weights: set) -> list:
    """The weight inputs `node` reads, directly or through a Transpose."""
    out = []
    for i in node.input:
        if i in weights:
            out.append(i)
        elif i in producer and producer[i].op_type == "Transpose" and producer[i].input[0] in weights:
            out.append(producer[i].input[0])
    return out


def rewrite(model: onnx.ModelProto, amax: dict, weight_inputs: set, fuse: bool = True) -> tuple[onnx.ModelProto, dict]:
    """Turns every GEMM X @ Wᵀ against a weight input W in `weight_inputs` into Fp8Quantize →
    Fp8MatMul (in place; returns the model and stats: rewritten, quantize, skipped {reason: [W]});
    with `fuse`, the layer norms and GEGLUs whose output is quantized quantize it themselves."""
    g = model.graph
    weights = set(weight_inputs) & {i.name for i in g.input}
    shapes = _weight_shape(model)
    producer = {o: n for n in g.node for o in n.output}
    skipped = collections.defaultdict(list)
    plan = {}  # id(node) → (X, W, bias, Transpose)
    for node in g.node:
        if node.op_type == "Transpose" and node.input and node.input[0] in weights:
            continue  # judged through its readers
        used = _uses(node, producer, weights)
        if not used:
            continue
        m = _match(node, producer, weights)
        if m is None:
            skipped[f"{node.domain + '.' if node.domain else ''}{node.op_type} (not a supported GEMM form)"] += used
            continue
        x, w, bias, t = m
        elem, dims = shapes[w]
        if elem != TensorProto.FLOAT16:
            skipped["weight not float16"].append(w)
        elif dims is None or len(dims) != 2:
            skipped["weight shape not static 2-D"].append(w)
        elif dims[0] % ALIGN or dims[1] % ALIGN:
            skipped[f"K or N not a multiple of {ALIGN}"].append(w)
        elif not (amax.get(w, 0.0) > 0.0):
            skipped["no calibrated amax"].append(w)
        else:
            plan[id(node)] = m
    # one quantize per activation tensor: the largest amax of its readers
    x_amax = collections.defaultdict(float)
    for x, w, _, _ in plan.values():
        x_amax[x] = max(x_amax[x], float(amax[w]))
    names = {n.name for n in g.node if n.name}

    def unique(base: str) -> str:
        name, k = base, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.add(name)
        return name

    quantized, nodes, detached = {}, [], []
    vinfo = {v.name: v for v in g.value_info}
    for node in g.node:
        m = plan.get(id(node))
        if m is None:
            nodes.append(node)
            continue
        x, w, bias, t = m
        scale = x_amax[x] / FP8_MAX
        if x not in quantized:
            quantized[x] = unique(f"{x}/fp8")
            nodes.append(helper.make_node("Fp8Quantize", [x], [quantized[x]], name=unique(f"{x}/Fp8Quantize"),
                                          domain=DOMAIN, scale=scale))
            shape = vinfo[x].type.tensor_type.shape if x in vinfo else None
            g.value_info.append(helper.make_tensor_value_info(
                quantized[x], TensorProto.UINT8,
                None if shape is None else [d.dim_value or d.dim_param or None for d in shape.dim]))
        out = node.output[0] if bias is None else unique(f"{node.output[0]}/fp8_nobias")
        nodes.append(helper.make_node("Fp8MatMul", [quantized[x], w], [out], name=unique(f"{node.name or w}/Fp8MatMul"),
                                      domain=DOMAIN, x_scale=scale))
        if bias is not None:
            nodes.append(helper.make_node("Add", [out, bias], [node.output[0]], name=unique(f"{node.name or w}/bias")))
        if t is not None:
            detached.append(t)
    # Transposes of weights that nothing reads any more
    read = {i for n in nodes for i in n.input} | {o.name for o in g.output}
    dropped = {id(t) for t in detached if t.output[0] not in read}
    g.ClearField("node")
    g.node.extend(n for n in nodes if id(n) not in dropped)
    fused = _fuse_producers(g, unique) if fuse else collections.Counter()
    if plan and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    stats = {"rewritten": len(plan), "quantize": len(quantized) - sum(fused.values()),
             "geglu_fused": fused["Fp8BiasSplitGelu"], "layer_norm_fused": fused["Fp8LayerNorm"],
             "transposes_removed": len(dropped),
             "skipped": {k: sorted(v) for k, v in skipped.items()}}
    return model, stats


# the default epsilon of each layer norm operator (ONNX Runtime's SkipLayerNormalization, ONNX's
# LayerNormalization) where the node has none
LN_EPSILON = {"SkipLayerNormalization": 1e-12, "LayerNormalization": 1e-5, "LayerNorm": 1e-5}


def _fused(p, q, readers, unique):
    """The katz node computing producer `p` and the Fp8Quantize `q` of its output in one, or None
    where they cannot be one (other readers of p's outputs than those the fused node gives)."""
    x, scale = q.input[0], _attrs(q)["scale"]
    if p.op_type == "BiasSplitGelu" and p.domain in ("com.microsoft", DOMAIN):  # ONNX Runtime's or katz's twin
        return helper.make_node("Fp8BiasSplitGelu", list(p.input), [q.output[0]], domain=DOMAIN,
                                name=unique(f"{p.name or x}/Fp8BiasSplitGelu"), scale=scale)
    if p.op_type not in LN_EPSILON or x != p.output[0]:
        return None
    a = _attrs(p)
    if p.op_type == "SkipLayerNormalization" and p.domain == "com.microsoft":
        ins = list(p.input) + [""] * (5 - len(p.input))  # X, skip, gamma, beta, bias
        extra, keep = list(p.output[1:3]), list(p.output[3:4])  # mean, inv std; the sum
    elif p.op_type == "LayerNormalization" and p.domain in ("", "ai.onnx") and a.get("axis", -1) == -1:
        ins = [p.input[0], "", p.input[1], p.input[2] if len(p.input) > 2 else "", ""]
        extra, keep = list(p.output[1:3]), []
    elif p.op_type == "LayerNorm" and p.domain == DOMAIN:  # katz's (tools/step_rewrite.py): the same inputs
        ins = list(p.input) + [""] * (5 - len(p.input))
        extra, keep = [], list(p.output[1:2])  # the sum
    else:
        return None
    if any(o and readers[o] for o in extra):
        return None
    while ins and not ins[-1]:
        ins.pop()
    outs = [q.output[0]] + [o for o in keep if o]
    return helper.make_node("Fp8LayerNorm", ins, outs, domain=DOMAIN, name=unique(f"{p.name or x}/Fp8LayerNorm"),
                            scale=scale, epsilon=float(a.get("epsilon", LN_EPSILON[p.op_type])))


def _fuse_producers(g, unique) -> collections.Counter:
    """Fp8Quantize nodes whose input is a GEGLU's (BiasSplitGelu) or a layer norm's output that
    nothing else reads: each pair becomes one katz node that quantizes as it computes (in place);
    returns how many of each kind."""
    readers = collections.Counter(i for n in g.node for i in n.input)
    readers.update(o.name for o in g.output)
    producer = {o: n for n in g.node for o in n.output}
    replace, drop, gone = {}, set(), set()
    for q in g.node:
        if q.op_type != "Fp8Quantize" or q.domain != DOMAIN:
            continue
        x = q.input[0]
        p = producer.get(x)
        if p is None or readers[x] != 1:
            continue
        fused = _fused(p, q, readers, unique)
        if fused is None:
            continue
        replace[id(q)] = fused
        drop.add(id(p))
        gone.add(x)
    if replace:
        nodes = [replace.get(id(n), n) for n in g.node if id(n) not in drop]
        g.ClearField("node")
        g.node.extend(nodes)
        keep = [v for v in g.value_info if v.name not in gone]
        g.ClearField("value_info")
        g.value_info.extend(keep)
    return collections.Counter(n.op_type for n in replace.values())


def n_skipped(stats: dict) -> int:
    return sum(len(v) for v in stats["skipped"].values())


def _tensor_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer) + sum(
        len(a.t.raw_data) for n in model.graph.node for a in n.attribute if a.HasField("t"))


def rewrite_bundle(bundle: Path, fuse: bool = True) -> dict:
    """Writes the bundle's fp8 UNet graphs from its fused ones and fp8_amax.json, and the
    manifest's `fp8` entry; returns that entry. `fuse=False`: every quantize a kernel of its own
    (the graphs before the norms and GEGLUs quantized their outputs themselves; for comparison)."""
    manifest = json.loads((bundle / "bundle.json").read_text())
    amax = json.loads((bundle / "fp8_amax.json").read_text())
    wmap = manifest["weights"]["map"]
    entry, total = {}, collections.Counter()
    for gname, key in GRAPHS.items():
        src = bundle / manifest["unet"][key]
        dest = bundle / f"{gname}.fp8.onnx"
        model = onnx.load(str(src))  # with its external data
        model, stats = rewrite(model, amax, {n for n, v in wmap.items() if v["graph"] == gname}, fuse)
        total.update(rewritten=stats["rewritten"], skipped=n_skipped(stats))
        data = dest.parent / (dest.name + ".data")
        data.unlink(missing_ok=True)  # onnx appends to an existing data file
        big = _tensor_bytes(model) > 1_800_000_000
        onnx.save(model, str(dest), save_as_external_data=big, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
        entry[gname] = dest.name
        why = "; ".join(f"{k}: {len(v)}" for k, v in stats["skipped"].items()) or "none"
        print(f"  {dest.name}: {stats['rewritten']} GEMMs fp8, {stats['quantize']} quantize nodes, "
              f"{stats['geglu_fused']} GEGLUs and {stats['layer_norm_fused']} layer norms quantized as they are made, "
              f"skipped {n_skipped(stats)} ({why})")
    entry.update(amax="fp8_amax.json", rewritten=total["rewritten"], skipped=total["skipped"])
    manifest["fp8"] = entry
    (bundle / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return entry


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="a GPU bundle directory with fp8_amax.json")
    ap.add_argument("--no-fuse", action="store_true",
                    help="leave every quantize a kernel of its own (no Fp8LayerNorm / Fp8BiasSplitGelu): for comparison")
    a = ap.parse_args(argv)
    for f in ("bundle.json", "fp8_amax.json"):
        if not (a.bundle / f).exists():
            ap.error(f"{a.bundle / f}: not found")
    rewrite_bundle(a.bundle, fuse=not a.no_fuse)


if __name__ == "__main__":
    sys.exit(main())
