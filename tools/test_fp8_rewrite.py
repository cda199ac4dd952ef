"""The fp8 rewrite of GPU bundles' UNet graphs (tools/fp8_rewrite.py), in the exporter's venv:

    .venv-tools/bin/python -m pytest -q tools/test_fp8_rewrite.py        (~30 s on CPU)

  - a small fp16 graph with every GEMM form the rewrite knows (MatMul of a transposed weight input,
    com.microsoft.FusedMatMul with transB, Gemm with a bias) and the ones it keeps in fp16 (N not a
    multiple of 16, no calibrated amax, a weight read untransposed): counts, one Fp8Quantize per
    shared activation, onnx.checker and strict shape inference; the rewritten graph evaluated with
    reference versions of katz.Fp8Quantize / katz.Fp8MatMul (ml_dtypes' float8_e4m3fn) is within 8%
    of the original (about 5%: e4m3's 3 mantissa bits on random data), and not equal to it;
  - the encoding itself: round to nearest even, saturation at ±448, subnormals;
  - `export_bundle.py --gpu --fp8` on the seeded tiny family (on the CPU: the export and the
    calibration need no GPU): every UNet Linear weight input's GEMM is fp8 in the fused graphs,
    fp8_amax.json and the manifest's fp8 entry are written, and the CLI rewrites the same again.
"""
from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import fp8_rewrite  # noqa: E402

F8 = ml_dtypes.float8_e4m3fn


def fp8_bits(x: np.ndarray) -> np.ndarray:
    """float8 e4m3fn bit patterns of x: round to nearest even, saturated at ±448."""
    return np.clip(x.astype(np.float32), -448.0, 448.0).astype(F8).view(np.uint8)


def fp8_value(bits: np.ndarray) -> np.ndarray:
    return bits.view(F8).astype(np.float32)


class Fp8Quantize(OpRun):
    op_domain = "katz"

    def _run(self, x, scale=None):
        return (fp8_bits(x.astype(np.float32) / np.float32(scale)),)


class Fp8MatMul(OpRun):
    op_domain = "katz"

    def _run(self, x8, w, x_scale=None):
        w = w.astype(np.float32)
        w_scale = np.float32(np.abs(w).max() / 448.0)
        wq = fp8_value(fp8_bits(w / w_scale)) * w_scale
        return ((fp8_value(x8) * np.float32(x_scale)) @ wq.T).astype(np.float16),


class FusedMatMul(OpRun):
    op_domain = "com.microsoft"

    def _run(self, a, b, alpha=1.0, transA=0, transB=0, transBatchA=0, transBatchB=0):
        a = np.swapaxes(a, -1, -2) if transA else a
        b = np.swapaxes(b, -1, -2) if transB else b
        return ((alpha * (a.astype(np.float32) @ b.astype(np.float32))).astype(a.dtype),)


OPS = [Fp8Quantize, Fp8MatMul, FusedMatMul]


def test_encoding():
    v = np.array([448, 1000, -1e6, 1.0, -2.0, 0.0, 2 ** -9, 1 + 1 / 16, 1 + 3 / 16, 0.1], np.float32)
    assert fp8_bits(v).tolist() == [0x7E, 0x7E, 0xFE, 0x38, 0xC0, 0x00, 0x01, 0x38, 0x3A, 0x1D]
    every = np.arange(256, dtype=np.uint8)
    finite = every[np.isfinite(fp8_value(every))]
    assert (fp8_bits(fp8_value(finite)) == finite).all()  # every finite code round-trips (-0 stays 0x80)


# ───────────── a small graph with every form ─────────────

D, S = 32, 8
WEIGHTS = {  # name: (N, K)
    "attn.to_q.weight": (D, D), "attn.to_k.weight": (D, D), "attn.to_v.weight": (D, D),
    "attn.to_out.weight": (D, D), "ctx.to_k.weight": (D, D), "ctx.to_v.weight": (D, D),
    "emb.weight": (48, D), "odd.weight": (24, D), "nocal.weight": (D, D), "raw.weight": (D, D),
}


def small_graph() -> onnx.ModelProto:
    f16 = TensorProto.FLOAT16
    n = []

    def linear(x, w, out):  # the TorchScript export of nn.Linear on 3-D input
        n.append(helper.make_node("Transpose", [w], [w + "_t"], name=w + "/Transpose", perm=[1, 0]))
        n.append(helper.make_node("MatMul", [x, w + "_t"], [out], name=w + "/MatMul"))

    for p in "qkv":
        linear("x", f"attn.to_{p}.weight", p)
    n.append(helper.make_node("Add", ["q", "k"], ["qk"], name="qk"))
    n.append(helper.make_node("Add", ["qk", "v"], ["s"], name="s"))
    linear("s", "attn.to_out.weight", "o_nb")
    n.append(helper.make_node("Add", ["o_nb", "bo"], ["o"], name="o"))
    for p in "kv":
        n.append(helper.make_node("FusedMatMul", ["ctx", f"ctx.to_{p}.weight"], [f"c{p}"], domain="com.microsoft",
                                  name=f"ctx.to_{p}/FusedMatMul", transB=1, alpha=1.0))
    n.append(helper.make_node("Gemm", ["pooled", "emb.weight", "be"], ["g"], name="emb/Gemm", transB=1))
    linear("x", "odd.weight", "odd")
    linear("x", "nocal.weight", "nocal")
    n.append(helper.make_node("MatMul", ["x", "raw.weight"], ["raw"], name="raw/MatMul"))
    inputs = [helper.make_tensor_value_info("x", f16, ["batch", S, D]),
              helper.make_tensor_value_info("ctx", f16, ["batch", 4, D]),
              helper.make_tensor_value_info("pooled", f16, ["batch", D])]
    inputs += [helper.make_tensor_value_info(w, f16, list(s)) for w, s in WEIGHTS.items()]
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(k).astype(np.float16), b)
             for b, k in (("bo", D), ("be", 48))]
    shapes = {"o": ["batch", S, D], "ck": ["batch", 4, D], "cv": ["batch", 4, D], "g": ["batch", 48],
              "odd": ["batch", S, 24], "nocal": ["batch", S, D], "raw": ["batch", S, D]}
    outs = [helper.make_tensor_value_info(o, f16, s) for o, s in shapes.items()]
    g = helper.make_graph(n, "small", inputs, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def feeds(batch: int = 2, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    f = {"x": rng.standard_normal((batch, S, D)), "ctx": 3 * rng.standard_normal((batch, 4, D)),
         "pooled": rng.standard_normal((batch, D))}
    f.update({w: rng.standard_normal(s) / np.sqrt(s[1]) for w, s in WEIGHTS.items()})
    return {k: v.astype(np.float16) for k, v in f.items()}


def calibrate(model) -> dict:
    """max |X| of each weight's GEMM input on the reference evaluator's intermediate results."""
    res = ReferenceEvaluator(model, new_ops=OPS).run(None, feeds(seed=7), intermediate=True)
    x_of = {"attn.to_q": "x", "attn.to_k": "x", "attn.to_v": "x", "attn.to_out": "s", "ctx.to_k": "ctx",
            "ctx.to_v": "ctx", "emb": "pooled", "odd": "x", "raw": "x"}  # nocal: none
    return {m + ".weight": float(np.abs(res[x].astype(np.float32)).max()) for m, x in x_of.items()}


@pytest.fixture(scope="module")
def small():
    model = small_graph()
    onnx.checker.check_model(model)
    amax = calibrate(model)
    amax["attn.to_k.weight"] *= 1.5  # readers of one X with different ranges: the largest wins
    rewritten, stats = fp8_rewrite.rewrite(small_graph(), amax, set(WEIGHTS))
    return model, rewritten, stats, amax


def test_small_counts(small):
    _, m, stats, amax = small
    assert stats["rewritten"] == 7 and stats["quantize"] == 4 and stats["transposes_removed"] == 4
    assert stats["skipped"] == {"K or N not a multiple of 16": ["odd.weight"], "no calibrated amax": ["nocal.weight"],
                                "MatMul (not a supported GEMM form)": ["raw.weight"]}
    assert fp8_rewrite.n_skipped(stats) == 3
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert ops["Fp8MatMul"] == 7 and ops["Fp8Quantize"] == 4 and ops["FusedMatMul"] == 0 and ops["Gemm"] == 0
    assert ops["Transpose"] == 2 and ops["MatMul"] == 3  # odd, nocal (with their Transposes), raw
    quant = {n.input[0]: n for n in m.graph.node if n.op_type == "Fp8Quantize"}
    assert sorted(quant) == ["ctx", "pooled", "s", "x"]
    scale = {x: helper.get_attribute_value(q.attribute[0]) for x, q in quant.items()}
    assert scale["x"] == pytest.approx(amax["attn.to_k.weight"] / 448, rel=1e-6)
    assert scale["ctx"] == pytest.approx(max(amax["ctx.to_k.weight"], amax["ctx.to_v.weight"]) / 448, rel=1e-6)
    for n in m.graph.node:
        if n.op_type == "Fp8MatMul":
            x = next(q for q in quant.values() if q.output[0] == n.input[0]).input[0]
            assert helper.get_attribute_value(n.attribute[0]) == scale[x] and n.domain == "katz"
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == len(names) and all(names)
    assert any(o.domain == "katz" and o.version == 1 for o in m.opset_import)
    onnx.checker.check_model(m, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    vi = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    assert vi["x/fp8"].elem_type == TensorProto.UINT8


def test_small_numerics(small):
    orig, m, _, _ = small
    f = feeds(batch=3, seed=11)  # not the calibration's values
    want = ReferenceEvaluator(orig, new_ops=OPS).run(None, f)
    got = ReferenceEvaluator(m, new_ops=OPS).run(None, f)
    for name, w, g in zip([o.name for o in orig.graph.output], want, got):
        assert g.dtype == np.float16 and g.shape == w.shape
        w, g = w.astype(np.float32), g.astype(np.float32)
        err = float(np.linalg.norm(g - w) / np.linalg.norm(w))
        if name in ("odd", "nocal", "raw"):
            assert err == 0, name  # kept in fp16
        else:
            assert 1e-3 < err < 0.08, (name, err)  # e4m3's 3 mantissa bits: about 5% on random data


def test_no_amax_rewrites_nothing():
    m, stats = fp8_rewrite.rewrite(small_graph(), {}, set(WEIGHTS))
    assert stats["rewritten"] == 0 and stats["quantize"] == 0
    assert not any(o.domain == "katz" for o in m.opset_import)
    assert m.graph == small_graph().graph


# ───────────── the tiny family, exported --gpu --fp8 ─────────────


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "tiny-gpu"
    r = subprocess.run([sys.executable, str(TOOLS / "export_bundle.py"), "--config", "tiny", "--random-init", "--gpu",
                        "--fp8", "--no-references", "--no-check", "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def check_fp8_graph(bundle: Path, gname: str, weights: set):
    src = onnx.load(str(bundle / f"{gname}.onnx"))
    m = onnx.load(str(bundle / f"{gname}.fp8.onnx"))
    readers = collections.defaultdict(list)
    for n in m.graph.node:
        for i in n.input:
            readers[i].append(n)
    # every weight input is read by exactly one Fp8MatMul and nothing else
    for w in weights:
        assert [n.op_type for n in readers[w]] == ["Fp8MatMul"], w
    fp8 = [n for n in m.graph.node if n.op_type == "Fp8MatMul"]
    quant = [n for n in m.graph.node if n.op_type == "Fp8Quantize"]
    assert len(fp8) == len(weights)
    assert len({q.input[0] for q in quant}) == len(quant)  # one per activation
    assert len(quant) < len(fp8)  # Q/K/V and the cross-attention K/V share theirs
    assert all(helper.get_attribute_value(q.attribute[0]) > 0 for q in quant)
    # all else as it was: the source's other nodes, the graph's inputs and outputs
    gone = {"MatMul": len(weights), "Transpose": len(weights)}
    before = collections.Counter(n.op_type for n in src.graph.node)
    after = collections.Counter(n.op_type for n in m.graph.node if n.domain != "katz")
    assert after == before - collections.Counter(gone)
    assert m.graph.input == src.graph.input and m.graph.output == src.graph.output
    onnx.checker.check_model(m)
    onnx.shape_inference.infer_shapes(m, strict_mode=True)


def test_tiny_gpu_bundle(bundle):
    manifest = json.loads((bundle / "bundle.json").read_text())
    wmap = manifest["weights"]["map"]
    unet = {g: {n for n, v in wmap.items() if v["graph"] == g} for g in ("unet_encoder", "unet_decoder")}
    amax = json.loads((bundle / "fp8_amax.json").read_text())
    assert set(amax) == unet["unet_encoder"] | unet["unet_decoder"]
    assert all(v > 0 for v in amax.values())
    n = len(amax)
    assert manifest["fp8"] == {"unet_encoder": "unet_encoder.fp8.onnx", "unet_decoder": "unet_decoder.fp8.onnx",
                               "amax": "fp8_amax.json", "rewritten": n, "skipped": 0}
    for g, ws in unet.items():
        check_fp8_graph(bundle, g, ws)
    # the CLI makes the same graphs again
    first = {g: (bundle / f"{g}.fp8.onnx").read_bytes() for g in unet}
    r = subprocess.run([sys.executable, str(TOOLS / "fp8_rewrite.py"), str(bundle)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert all((bundle / f"{g}.fp8.onnx").read_bytes() == b for g, b in first.items())
    assert json.loads((bundle / "bundle.json").read_text())["fp8"] == manifest["fp8"]


def test_fp8_needs_gpu_flag():
    r = subprocess.run([sys.executable, str(TOOLS / "export_bundle.py"), "--config", "tiny", "--fp8",
                        "--out", "/nonexistent"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--fp8 goes with --gpu" in r.stderr
