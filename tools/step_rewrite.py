#!/usr/bin/env python3
"""Rewrites a GPU bundle's step graphs so that each UNet (and ControlNet) step moves fewer bytes,
with the same arithmetic up to fp16 rounding: run at export on --gpu bundles (tools/export_bundle.py;
--no-step-rewrite leaves the graphs as ONNX Runtime's fusion tool made them).

    python tools/step_rewrite.py BUNDLE_DIR       (a --gpu base or ControlNet bundle; in place)

1. katz's GEGLU: com.microsoft.BiasSplitGelu(X, bias) ⇒ katz.BiasSplitGelu(X, bias), one of the
   service's own CUDA operators (domain `katz`, onnx/src/ops.rs): the feed-forward's GEGLU by the
   same f32 formula, with 16-byte loads and stores where ONNX Runtime's kernel moves one fp16 value a load
   (kernels/src/cuda/fused.cu).
2. katz's layer norm: an fp16 LayerNormalization over the last axis ⇒ katz.LayerNorm (the same
   normalisation in one pass, statistics in f32; ONNX Runtime's kernel for it reads one fp16 value
   at a time), with the bias add before it folded in where it reads `Add(bias, X)` (the transformer's
   proj_in): katz.LayerNorm(X, bias) ─▶ LN(X + bias), and X + bias as its second output for the
   other readers of the sum (the residual):

        X ─Add(bias)─▶ s ─LayerNormalization─▶ y    ⇒    X ─katz.LayerNorm(bias)─▶ y, s

3. Convolution biases into the group norm after them: a convolution (`com.microsoft.NhwcConv`)
   whose output only a `com.microsoft.SkipGroupNorm` reads adds its bias in a pass of its own over
   the output (ONNX Runtime's cuDNN convolution adds it with cudnnAddTensor); SkipGroupNorm adds
   an optional per-channel bias to `X + skip` as it reads them. The bias moves there (the two
   convolutions' biases summed where both of its inputs are such convolutions):

        h ─NhwcConv(W, b₁)─┐                           h ─NhwcConv(W)─┐
        x ─NhwcConv(W₂, b₂)┴─SkipGroupNorm ─▶ y, s  ⇒  x ─NhwcConv(W₂)┴─SkipGroupNorm(bias = b₁ + b₂) ─▶ y, s

   (a resnet's conv1 before the time embedding's add, its conv2 and shortcut before the residual
   add): the same sums, rounded once instead of after each add.

A base bundle's UNet step graphs (with their deterministic twins, which have no SkipGroupNorm, and
the fp8 graphs of a bundle exported before: the exporter now makes them from the rewritten pair)
and a ControlNet bundle's graph are rewritten; preludes, text encoders and the VAE
are not (they run once per job or image). The bundles run on the CUDA provider only, as GPU bundles
do. `rewrite()` is the same on an in-memory model.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

DOMAIN = "katz"
# ONNX Runtime's operator → katz's twin (same inputs, outputs and formula)
TWINS = {("com.microsoft", "BiasSplitGelu"): "BiasSplitGelu"}


def katz_twins(model: onnx.ModelProto) -> int:
    """Renames each operator of TWINS to katz's twin (in place); how many."""
    done = 0
    for n in model.graph.node:
        twin = TWINS.get((n.domain, n.op_type))
        if twin is not None:
            n.domain, n.op_type = DOMAIN, twin
            done += 1
    if done and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return done


def layer_norms(model: onnx.ModelProto) -> int:
    """Makes each fp16 LayerNormalization over the last axis katz's (in place), with the bias add
    before it folded in where it reads `Add(bias, X)` of a [C] initializer; how many."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    fp16 = TensorProto.FLOAT16
    done, drop, at = 0, set(), {}
    for ln in g.node:
        if ln.domain not in ("", "ai.onnx") or ln.op_type != "LayerNormalization" or len(ln.output) != 1:
            continue
        a = {x.name: helper.get_attribute_value(x) for x in ln.attribute}
        scale = inits.get(ln.input[1])
        if a.get("axis", -1) != -1 or scale is None or scale.data_type != fp16 or len(scale.dims) != 1:
            continue
        c = scale.dims[0]
        if c % 8 or c > 8192:  # katz's kernel: 8 values a thread, one block a row
            continue
        beta = ln.input[2] if len(ln.input) > 2 else ""
        x, bias, sum_out = ln.input[0], "", ""
        add = producer.get(x)
        if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx") and x not in outputs:
            consts = [i for i in add.input if i in inits and inits[i].data_type == fp16 and list(inits[i].dims) == [c]]
            others = [i for i in add.input if i not in consts]
            if len(consts) == 1 and len(others) == 1:
                x, bias, sum_out = others[0], consts[0], add.output[0]
                drop.add(id(add))
        node = helper.make_node("LayerNorm", [x, "", ln.input[1], beta, bias], [ln.output[0]] + ([sum_out] if sum_out else []),
                                domain=DOMAIN, name=(ln.name or ln.output[0]) + "/katz",
                                epsilon=float(a.get("epsilon", 1e-5)))
        # where the Add was (its output's readers come after it), else where the norm was
        at[id(add) if sum_out else id(ln)] = node
        drop.add(id(ln))
        done += 1
    if done:
        nodes = []
        for n in g.node:
            if id(n) in at:
                nodes.append(at[id(n)])
            elif id(n) not in drop:
                nodes.append(n)
        del g.node[:]
        g.node.extend(nodes)
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return done


def _array(t: onnx.TensorProto, base: Path | None) -> np.ndarray:
    if uses_external_data(t):
        if base is None:
            raise ValueError(f"{t.name}: external data, and no directory to read it from")
        c = onnx.TensorProto()
        c.CopyFrom(t)
        load_external_data_for_tensor(c, str(base))
        return numpy_helper.to_array(c)
    return numpy_helper.to_array(t)


def fold_conv_biases(model: onnx.ModelProto, base: Path | None = None) -> int:
    """Moves the biases of convolutions that only a SkipGroupNorm reads into its bias input (in
    place); how many convolutions lost their bias. `base`: the directory of the model's external
    data (where two biases must be summed)."""
    g = model.graph
    readers = collections.defaultdict(list)
    for n in g.node:
        for t in n.input:
            if t:
                readers[t].append(n)
    outputs = {o.name for o in g.output}
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def foldable(t: str, sgn) -> onnx.NodeProto | None:
        conv = producer.get(t)
        if (conv is None or conv.domain != "com.microsoft" or conv.op_type != "NhwcConv" or len(conv.input) < 3
                or not conv.input[2] or conv.input[2] not in inits or t in outputs or readers[t] != [sgn]):
            return None
        return conv

    done = 0
    for sgn in g.node:
        if sgn.domain != "com.microsoft" or sgn.op_type != "SkipGroupNorm":
            continue
        if len(sgn.input) > 4 and sgn.input[4]:
            continue  # a bias already
        convs = [c for c in (foldable(sgn.input[0], sgn), foldable(sgn.input[3], sgn)) if c is not None]
        if not convs:
            continue
        names = [c.input[2] for c in convs]
        if len(names) == 1:
            bias = names[0]
        else:
            arrays = [_array(inits[n], base) for n in names]
            total = (arrays[0].astype(np.float32) + arrays[1].astype(np.float32)).astype(arrays[0].dtype)
            bias = f"{names[0]}+{names[1]}"
            g.initializer.append(numpy_helper.from_array(total, bias))
        while len(sgn.input) < 5:
            sgn.input.append("")
        sgn.input[4] = bias
        for c in convs:
            del c.input[2]
            done += 1
    # biases nothing reads any more (summed into a new one)
    read = {t for n in g.node for t in n.input} | {i.name for i in g.input}
    keep = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(keep)
    return done


def rewrite(model: onnx.ModelProto, base: Path | None = None) -> dict:
    """The three rewrites (in place); {"BiasSplitGelu": n, "LayerNorm": n, "conv biases": n}."""
    return {"BiasSplitGelu": katz_twins(model), "LayerNorm": layer_norms(model),
            "conv biases": fold_conv_biases(model, base)}


def _graphs(bundle: Path) -> list[Path]:
    m = json.loads((bundle / "bundle.json").read_text())
    if m.get("kind") == "controlnet":
        return [bundle / m["graph"]]
    unet = m["unet"]
    files = [unet["encoder"], unet["decoder"]]
    # the deterministic twins and the fp8 graphs of the pair
    for extra in (m.get("exact") or {}, m.get("fp8") or {}):
        files += [extra[k] for k in ("unet_encoder", "unet_decoder") if isinstance(extra.get(k), str)]
    return [bundle / f for f in dict.fromkeys(files) if (bundle / f).exists()]


def rewrite_bundle(bundle: Path) -> dict:
    """Rewrites the bundle's step graphs in place; {graph file: counts} of those changed. The
    weights stay in each graph's external data file, which still matches (summed biases are
    small and go into the graph itself)."""
    done = {}
    for path in _graphs(bundle):
        model = onnx.load(str(path), load_external_data=False)
        counts = rewrite(model, path.parent)
        if any(counts.values()):
            onnx.save(model, str(path))
            done[path.name] = counts
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    a = ap.parse_args(argv)
    done = rewrite_bundle(a.bundle)
    for f, c in done.items():
        print(f"  {f}: {c['BiasSplitGelu']} BiasSplitGelu → katz.BiasSplitGelu, {c['LayerNorm']} LayerNormalization "
              f"→ katz.LayerNorm, {c['conv biases']} convolution biases into the SkipGroupNorm after them")
    if not done:
        print(f"{a.bundle}: nothing to rewrite (or rewritten before)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
