#!/usr/bin/env python3
"""Moves what the UNet step graphs compute from a job's constants alone into a graph that runs
once per job: the job prelude.

    python tools/job_prelude.py BUNDLE_DIR          (a base bundle; rewrites its UNet pair in place)

A UNet step reads the sample and the timestep, which change every step, and the text conditioning
(`encoder_hidden_states`, `text_embeds`, `time_ids`) and the weights, which do not change within a
job (a LoRA switch changes the weights: the prelude runs again then). Every node whose inputs are
all job constants, and which reads the conditioning, gives the same result at every step: the
cross-attention keys and values of the text tokens (two GEMMs per transformer block, 140 in SDXL),
SDXL's added time and text embedding, the casts of the conditioning.

    conditioning, weights ─▶ unet_prelude.onnx ─▶ job.unet_encoder.<t>, job.unet_decoder.<t> …
                                                   (once per job and LoRA switch)
    sample, timestep, job.* (+ the original inputs) ─▶ unet_encoder ─▶ unet_decoder   (each step)

The step graphs keep every input they had (those no longer read are left unread) and gain one
input per tensor the prelude now makes, named `job.<graph>.<tensor>`; the prelude's outputs carry
the same names. Shape computations (`Shape`, `Size` and what follows from them) stay in the step
graphs, so the prelude makes only floating-point tensors. The manifest's `unet.prelude` names the
prelude. `hoist()` does the same on in-memory models.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnx
from onnx import helper

CONDITIONING = ("encoder_hidden_states", "text_embeds", "time_ids")
# a ControlNet's conditioning image is the job's too (its embedding convolutions run at full size)
CONTROLNET_CONDITIONING = CONDITIONING + ("controlnet_cond",)
STEP_INPUTS = ("sample", "timestep", "emb", "mid")
NOT_HOISTED = {"Shape", "Size", "If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike",
               "RandomUniformLike", "Multinomial", "Dropout"}
PREFIX = "job."
GRAPHS = ("unet_encoder", "unet_decoder")


def _is_step_input(name: str) -> bool:
    return name in STEP_INPUTS or name.startswith("skip_")


def _plan(g: onnx.GraphProto, conditioning=CONDITIONING):
    """(hoisted nodes, their constant ancestors, cut tensors) of graph `g`, by node index."""
    inputs = {i.name for i in g.input}
    const = {t.name for t in g.initializer} | {i for i in inputs if not _is_step_input(i)}
    from_cond = {i for i in inputs if i in conditioning}
    hoisted, producer = set(), {}
    for k, n in enumerate(g.node):
        for o in n.output:
            producer[o] = k
        ins = [i for i in n.input if i]
        if not all(i in const for i in ins) or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                    for a in n.attribute):
            continue
        const.update(n.output)
        if n.op_type not in NOT_HOISTED and any(i in from_cond for i in ins):
            hoisted.add(k)
            from_cond.update(n.output)
    # the constant nodes the hoisted ones read (Constant, weight transposes): copied into the prelude
    ancestors, todo = set(), [i for k in hoisted for i in g.node[k].input if i]
    while todo:
        t = todo.pop()
        k = producer.get(t)
        if k is None or k in hoisted or k in ancestors:
            continue
        ancestors.add(k)
        todo.extend(i for i in g.node[k].input if i)
    # the step nodes still needed (from the graph's outputs back, through the nodes not hoisted):
    # a shape computation whose only readers moved into the prelude goes with them
    need, live = {o.name for o in g.output}, set()
    for k in reversed(range(len(g.node))):
        n = g.node[k]
        if k not in hoisted and any(o in need for o in n.output):
            live.add(k)
            need.update(i for i in n.input if i)
    made = {o for k in hoisted for o in g.node[k].output}
    cuts = [o for k in sorted(hoisted) for o in g.node[k].output if o in made & need]
    return hoisted, ancestors, cuts


def _types(model: onnx.ModelProto) -> dict:
    """tensor name → TypeProto of the model, after ONNX Runtime's symbolic shape inference (which
    knows its contrib operators) or, failing that, ONNX's own."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception as e:  # noqa: BLE001 (any failure: fall back, say so)
        print(f"  symbolic shape inference failed ({e}); using ONNX's", file=sys.stderr)
        inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {v.name: v.type for v in [*g.value_info, *g.input, *g.output]}


def hoist(models: dict[str, onnx.ModelProto], conditioning=CONDITIONING,
          name: str = "unet_prelude") -> tuple[onnx.ModelProto, dict]:
    """Rewrites the step graphs `models` ({graph name: model}, in place) and returns the prelude
    and stats {graph: {"hoisted": n, "cuts": n}}."""
    nodes, inits, ins, outs, stats = [], {}, {}, [], {}
    opsets = {}
    for gname, model in models.items():
        g = model.graph
        hoisted, ancestors, cuts = _plan(g, conditioning)
        stats[gname] = {"hoisted": len(hoisted), "cuts": len(cuts)}
        if not hoisted:
            continue
        for o in model.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        types = _types(_subgraph(model, hoisted | ancestors, cuts))
        # the prelude's part of this graph, its internal names prefixed (the two graphs' names may clash)
        local = {o for k in hoisted | ancestors for o in g.node[k].output}
        init_names = {t.name for t in g.initializer}
        used_inits = set()

        def rename(t: str) -> str:
            if t in cuts:
                return f"{PREFIX}{gname}.{t}"
            if t in local or t in init_names:
                return f"{gname}/{t}"
            return t

        for k in sorted(hoisted | ancestors):
            n = onnx.NodeProto()
            n.CopyFrom(g.node[k])
            for i, t in enumerate(n.input):
                if t in init_names:
                    used_inits.add(t)
                if t:
                    n.input[i] = rename(t)
            for i, t in enumerate(n.output):
                n.output[i] = rename(t)
            n.name = f"{gname}/{n.name}" if n.name else ""
            nodes.append(n)
        for t in g.initializer:
            if t.name in used_inits:
                c = onnx.TensorProto()
                c.CopyFrom(t)
                c.name = rename(t.name)
                inits[c.name] = c
        for i in g.input:
            if any(i.name in g.node[k].input for k in hoisted | ancestors):
                ins.setdefault(i.name, i)
        missing = [t for t in cuts if t not in types]
        if missing:
            raise SystemExit(f"{gname}: no type inferred for {missing[:3]}")
        for t in cuts:
            outs.append(helper.make_value_info(rename(t), types[t]))
        # the step graph: the hoisted nodes out, the cut tensors in as inputs
        keep = []
        for k, n in enumerate(g.node):
            if k not in hoisted:
                keep.append(onnx.NodeProto())
                keep[-1].CopyFrom(n)
        for n in keep:
            for i, t in enumerate(n.input):
                if t in cuts:
                    n.input[i] = rename(t)
        del g.node[:]
        g.node.extend(keep)
        for t in cuts:
            g.input.append(helper.make_value_info(rename(t), types[t]))
        _prune(g)
    prelude = helper.make_model(
        helper.make_graph(nodes, name, list(ins.values()), outs, list(inits.values())),
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
    )
    prelude.ir_version = max(m.ir_version for m in models.values())
    return prelude, stats


def _subgraph(model: onnx.ModelProto, keep: set, outputs: list) -> onnx.ModelProto:
    """The nodes `keep` of `model` as a model with `outputs` (for shape inference)."""
    g = model.graph
    read = {i for k in keep for i in g.node[k].input}
    graph = helper.make_graph([g.node[k] for k in sorted(keep)], "part", [i for i in g.input if i.name in read],
                              [helper.make_empty_tensor_value_info(o) for o in outputs],
                              [t for t in g.initializer if t.name in read])
    m = helper.make_model(graph, opset_imports=list(model.opset_import))
    m.ir_version = model.ir_version
    return m


def _prune(g: onnx.GraphProto) -> None:
    """Drops the nodes and initializers nothing reads any more (the graph inputs stay)."""
    live = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)


def _save(model: onnx.ModelProto, path: Path) -> None:
    for f in path.parent.glob(path.name + "*.data"):
        f.unlink()
    big = model.ByteSize() > 1_800_000_000 if _fits_proto(model) else True
    onnx.save(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)


def _fits_proto(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # noqa: BLE001 (protobuf refuses over 2 GB)
        return False


def hoist_bundle(bundle: Path) -> dict | None:
    """Hoists the bundle's UNet pair (in place) and writes unet_prelude.onnx and the manifest's
    `unet.prelude`; the stats, or None when there was nothing to hoist or it was done before."""
    manifest_path = bundle / "bundle.json"
    manifest = json.loads(manifest_path.read_text())
    unet = manifest["unet"]
    if unet.get("prelude"):
        return None
    files = {"unet_encoder": bundle / unet["encoder"], "unet_decoder": bundle / unet["decoder"]}
    models = {k: onnx.load(str(p)) for k, p in files.items()}
    prelude, stats = hoist(models)
    if not any(s["hoisted"] for s in stats.values()):
        return None
    for k, p in files.items():
        _save(models[k], p)
    _save(prelude, bundle / "unet_prelude.onnx")
    unet["prelude"] = "unet_prelude.onnx"
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    for k, s in stats.items():
        print(f"  {k}: {s['hoisted']} nodes into the prelude (once per job), {s['cuts']} tensors handed over")
    return stats


def hoist_controlnet_bundle(bundle: Path) -> dict | None:
    """The same for a ControlNet bundle (its conditioning image among the job's constants):
    controlnet_prelude.onnx and the manifest's `prelude`; the stats, or None."""
    manifest_path = bundle / "bundle.json"
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("prelude"):
        return None
    path = bundle / manifest["graph"]
    models = {"controlnet": onnx.load(str(path))}
    prelude, stats = hoist(models, CONTROLNET_CONDITIONING, "controlnet_prelude")
    if not stats["controlnet"]["hoisted"]:
        return None
    _save(models["controlnet"], path)
    _save(prelude, bundle / "controlnet_prelude.onnx")
    manifest["prelude"] = "controlnet_prelude.onnx"
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    s = stats["controlnet"]
    print(f"  controlnet: {s['hoisted']} nodes into the prelude (once per job), {s['cuts']} tensors handed over")
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path, help="a base bundle (its UNet pair) or a ControlNet bundle")
    a = ap.parse_args(argv)
    kind = json.loads((a.bundle / "bundle.json").read_text()).get("kind")
    done = hoist_controlnet_bundle(a.bundle) if kind == "controlnet" else hoist_bundle(a.bundle)
    if done is None:
        print(f"{a.bundle}: nothing to hoist (or its prelude exists)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
