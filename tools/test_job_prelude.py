"""The UNet prelude (tools/job_prelude.py) on the committed tiny bundle, on the CPU:

    .katz/py/bin/python -m pytest -q tools/test_job_prelude.py          (run by `make test`)

  - the hoist moves every cross-attention key and value GEMM of the text tokens out of the step
    graphs, and the prelude's outputs are exactly the step graphs' new inputs;
  - prelude + step graphs give the same emb, mid, skips and noise prediction as the whole step
    graphs (ONNX Runtime, CPU, fp32: bit for bit);
  - `katz generate` on the hoisted bundle (the host loop runs the prelude once per job) writes the
    same PNG as on the bundle it came from, with and without a LoRA;
  - the same for the tiny ControlNet, whose image embedding (convolutions) moves too: its step
    outputs bit-identical, and the same PNG with the hoisted ControlNet as with the whole one.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import job_prelude  # noqa: E402

TINY = ROOT / "bundles" / "tiny-sdxl"
TINY_CN = ROOT / "bundles" / "tiny-sdxl-controlnet"
COND = ROOT / "bundles" / "examples" / "cond_a.png"
KATZ = Path(os.environ.get("KATZ_BIN", ROOT / "target" / "release" / "katz"))
LORA = ROOT / "bundles" / "loras" / "tiny-lora-a.safetensors"


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (F32 and F16 only: the tiny bundle's weights)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base, out = 8 + n, {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        dt = {"F32": np.float32, "F16": np.float16}[e["dtype"]]
        a, b = e["data_offsets"]
        out[name] = np.frombuffer(raw[base + a:base + b], dtype=dt).reshape(e["shape"])
    return out


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feeder(weights: dict, seed: int, shapes: dict):
    """feed(session, known): the session's inputs from `known`, else `weights`, else seeded random
    values (shapes from `shapes`, free dimensions 2), which join `known` so that every session of
    one comparison sees the same ones."""
    rng = np.random.default_rng(seed)

    def feed(s, known):
        f = {}
        for i in s.get_inputs():
            if i.name in known:
                f[i.name] = known[i.name]
            elif i.name in weights:
                f[i.name] = weights[i.name]
            else:
                shape = shapes.get(i.name, [d if isinstance(d, int) else 2 for d in i.shape])
                f[i.name] = rng.standard_normal(shape).astype(np.float32)
                known[i.name] = f[i.name]
        return f

    return feed


@pytest.fixture(scope="module")
def hoisted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prelude") / "tiny-sdxl"
    shutil.copytree(TINY, out)
    assert job_prelude.hoist_bundle(out) is not None
    return out


@pytest.fixture(scope="module")
def hoisted_cn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prelude-cn") / "tiny-sdxl-controlnet"
    shutil.copytree(TINY_CN, out)
    assert job_prelude.hoist_controlnet_bundle(out) is not None
    return out


def test_the_text_keys_and_values_leave_the_step_graphs(hoisted):
    manifest = json.loads((hoisted / "bundle.json").read_text())
    assert manifest["unet"]["prelude"] == "unet_prelude.onnx"
    prelude = onnx.load(str(hoisted / "unet_prelude.onnx"))
    outs = {o.name for o in prelude.graph.output}
    made = set()
    for g in ("unet_encoder", "unet_decoder"):
        step = onnx.load(str(hoisted / f"{g}.onnx"))
        job_inputs = {i.name for i in step.graph.input if i.name.startswith(job_prelude.PREFIX)}
        assert job_inputs and all(n.startswith(f"job.{g}.") for n in job_inputs)
        made |= job_inputs
        # every original input is still declared (the service binds them as before)
        whole = onnx.load(str(TINY / f"{g}.onnx"))
        assert {i.name for i in whole.graph.input} <= {i.name for i in step.graph.input}
        # no step node reads a cross-attention key or value weight any more
        read = {i for n in step.graph.node for i in n.input}
        kv = [i.name for i in whole.graph.input if ".attn2.to_k." in i.name or ".attn2.to_v." in i.name]
        assert kv and not (set(kv) & read)
        assert len(step.graph.node) < len(whole.graph.node)
    assert outs == made


def test_prelude_and_step_graphs_equal_the_whole_graphs(hoisted):
    feed = feeder(read_safetensors(TINY / "weights.safetensors"), 0, {"sample": [2, 4, 16, 16]})
    known = {"timestep": np.array([500.0, 500.0], np.float32)}
    enc, dec = session(TINY / "unet_encoder.onnx"), session(TINY / "unet_decoder.onnx")
    enc_names = [o.name for o in enc.get_outputs()]
    whole = dict(zip(enc_names, enc.run(None, feed(enc, known))))
    whole["noise_pred"] = dec.run(None, feed(dec, {**known, **whole}))[0]

    pre = session(hoisted / "unet_prelude.onnx")
    consts = dict(zip([o.name for o in pre.get_outputs()], pre.run(None, feed(pre, dict(known)))))
    enc2, dec2 = session(hoisted / "unet_encoder.onnx"), session(hoisted / "unet_decoder.onnx")
    split = dict(zip(enc_names, enc2.run(None, feed(enc2, {**known, **consts}))))
    split["noise_pred"] = dec2.run(None, feed(dec2, {**known, **consts, **split}))[0]
    for name, v in whole.items():
        np.testing.assert_array_equal(split[name], v, err_msg=name)


@pytest.mark.skipif(not KATZ.exists(), reason=f"{KATZ} not built (cargo build --release)")
@pytest.mark.parametrize("lora", [False, True])
def test_generate_writes_the_same_png_from_the_hoisted_bundle(hoisted, tmp_path, lora):
    pngs = []
    for bundle in (TINY, hoisted):
        out = tmp_path / f"{bundle.parent.name}.png"
        args = [str(KATZ), "generate", "--bundle", str(bundle), "--prompt", "a red circle", "--seed", "7",
                "--steps", "4", "--output", str(out)]
        if lora:
            args += ["--lora", f"{LORA}:0.8"]
        r = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        pngs.append(out.read_bytes())
    assert pngs[0] == pngs[1]


def test_the_controlnet_image_embedding_leaves_its_step_graph(hoisted_cn):
    manifest = json.loads((hoisted_cn / "bundle.json").read_text())
    assert manifest["prelude"] == "controlnet_prelude.onnx"
    prelude = onnx.load(str(hoisted_cn / "controlnet_prelude.onnx"))
    step = onnx.load(str(hoisted_cn / "controlnet.onnx"))
    whole = onnx.load(str(TINY_CN / "controlnet.onnx"))
    convs = lambda m: sum(n.op_type == "Conv" for n in m.graph.node)  # noqa: E731
    assert convs(prelude) > 0 and convs(step) == convs(whole) - convs(prelude)
    job_inputs = {i.name for i in step.graph.input if i.name.startswith("job.controlnet.")}
    assert job_inputs == {o.name for o in prelude.graph.output}


def test_controlnet_prelude_and_step_graph_equal_the_whole_graph(hoisted_cn):
    w = read_safetensors(TINY_CN / "weights.safetensors") if (TINY_CN / "weights.safetensors").exists() else {}
    feed = feeder(w, 1, {"sample": [2, 4, 16, 16], "controlnet_cond": [2, 3, 128, 128]})
    known = {"timestep": np.array([500.0, 500.0], np.float32)}
    whole = session(TINY_CN / "controlnet.onnx")
    names = [o.name for o in whole.get_outputs()]
    want = whole.run(None, feed(whole, known))
    pre = session(hoisted_cn / "controlnet_prelude.onnx")
    consts = dict(zip([o.name for o in pre.get_outputs()], pre.run(None, feed(pre, dict(known)))))
    step = session(hoisted_cn / "controlnet.onnx")
    got = step.run(None, feed(step, {**known, **consts}))
    for n, a, b in zip(names, want, got):
        np.testing.assert_array_equal(b, a, err_msg=n)


@pytest.mark.skipif(not KATZ.exists(), reason=f"{KATZ} not built (cargo build --release)")
def test_generate_writes_the_same_png_with_the_hoisted_controlnet(hoisted, hoisted_cn, tmp_path):
    pngs = []
    for base, cn in ((TINY, TINY_CN), (hoisted, hoisted_cn)):
        out = tmp_path / f"{cn.parent.name}.png"
        args = [str(KATZ), "generate", "--bundle", str(base), "--prompt", "a red circle", "--seed", "3",
                "--steps", "4", "--controlnet", f"{cn}={COND}:0.7", "--output", str(out)]
        r = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        pngs.append(out.read_bytes())
    assert pngs[0] == pngs[1]
