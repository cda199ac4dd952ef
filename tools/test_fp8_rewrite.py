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
    calibration need no GPU): every UNet Linear weight input's GEMM is fp8 in the fused graphs (but
    the text tokens' cross-attention keys and values, which the prelude computes once per job),
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


def geglu(x, bias):
    """com.microsoft.BiasSplitGelu: [left | right] + bias → left · gelu(right) (erf GELU)"""
    from math import erf, sqrt
    y = (x + bias).astype(np.float32)
    h = y.shape[-1] // 2
    r = y[..., h:]
    return y[..., :h] * (r * 0.5 * (np.vectorize(erf)(r / sqrt(2)) + 1.0))


class BiasSplitGelu(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, bias):
        return (geglu(x, bias).astype(x.dtype),)


class Fp8BiasSplitGelu(OpRun):
    op_domain = "katz"

    def _run(self, x, bias, scale=None):
        return (fp8_bits(geglu(x, bias).astype(np.float16).astype(np.float32) / np.float32(scale)),)


def layer_norm(x, gamma, beta, eps):
    x = x.astype(np.float32)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma.astype(np.float32) + (0 if beta is None else beta.astype(np.float32))


class SkipLayerNormalization(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, skip, gamma, beta=None, bias=None, epsilon=1e-12):
        s = x + (0 if bias is None else bias) + skip
        stat = np.zeros(s.shape[:-1] + (1,), np.float32)  # mean, inv std: unread here
        return layer_norm(s, gamma, beta, epsilon).astype(x.dtype), stat, stat, s.astype(x.dtype)


class Fp8LayerNorm(OpRun):
    op_domain = "katz"

    def _run(self, x, skip=None, gamma=None, beta=None, bias=None, epsilon=None, scale=None):
        s = x + (0 if bias is None else bias) + (0 if skip is None else skip)
        y = layer_norm(s, gamma, beta, epsilon).astype(np.float16).astype(np.float32)
        return fp8_bits(y / np.float32(scale)), s.astype(x.dtype)


OPS = [Fp8Quantize, Fp8MatMul, FusedMatMul, BiasSplitGelu, Fp8BiasSplitGelu, SkipLayerNormalization, Fp8LayerNorm]


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


def ff_graph(extra_reader: bool) -> onnx.ModelProto:
    """A feed-forward as ONNX Runtime's fusions leave it: FusedMatMul → BiasSplitGelu → MatMul of a
    transposed weight (and, with `extra_reader`, the GEGLU's output also a graph output)."""
    f16 = TensorProto.FLOAT16
    n = [helper.make_node("FusedMatMul", ["x", "ff.0.weight"], ["h"], domain="com.microsoft", name="ff0",
                          transB=1, alpha=1.0),
         helper.make_node("BiasSplitGelu", ["h", "b0"], ["gg"], domain="com.microsoft", name="geglu"),
         helper.make_node("Transpose", ["ff.2.weight"], ["w2t"], name="ff2/Transpose", perm=[1, 0]),
         helper.make_node("MatMul", ["gg", "w2t"], ["y"], name="ff2")]
    inputs = [helper.make_tensor_value_info("x", f16, ["batch", S, D]),
              helper.make_tensor_value_info("ff.0.weight", f16, [4 * D, D]),
              helper.make_tensor_value_info("ff.2.weight", f16, [D, 2 * D])]
    b0 = onnx.numpy_helper.from_array(np.random.default_rng(3).standard_normal(4 * D).astype(np.float16), "b0")
    outs = [helper.make_tensor_value_info("y", f16, ["batch", S, D])]
    if extra_reader:
        outs.append(helper.make_tensor_value_info("gg", f16, ["batch", S, 2 * D]))
    g = helper.make_graph(n, "ff", inputs, outs, [b0],
                          value_info=[helper.make_tensor_value_info("gg", f16, ["batch", S, 2 * D])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def ff_feeds(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((2, S, D)).astype(np.float16),
            "ff.0.weight": (rng.standard_normal((4 * D, D)) / np.sqrt(D)).astype(np.float16),
            "ff.2.weight": (rng.standard_normal((D, 2 * D)) / np.sqrt(2 * D)).astype(np.float16)}


@pytest.mark.parametrize("extra_reader", [False, True])
def test_geglu_quantized_as_it_is_made(extra_reader):
    orig = ff_graph(extra_reader)
    res = ReferenceEvaluator(orig, new_ops=OPS).run(None, ff_feeds(7), intermediate=True)
    amax = {"ff.0.weight": float(np.abs(res["x"]).max()), "ff.2.weight": float(np.abs(res["gg"]).max())}
    m, stats = fp8_rewrite.rewrite(ff_graph(extra_reader), amax, {"ff.0.weight", "ff.2.weight"})
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert stats["rewritten"] == 2
    if extra_reader:  # the fp16 GEGLU is read elsewhere: kept, and quantized apart
        assert stats["geglu_fused"] == 0 and stats["quantize"] == 2
        assert ops["BiasSplitGelu"] == 1 and ops["Fp8Quantize"] == 2 and ops["Fp8BiasSplitGelu"] == 0
    else:
        assert stats["geglu_fused"] == 1 and stats["quantize"] == 1
        assert ops["BiasSplitGelu"] == 0 and ops["Fp8Quantize"] == 1 and ops["Fp8BiasSplitGelu"] == 1
        fused = next(n for n in m.graph.node if n.op_type == "Fp8BiasSplitGelu")
        assert list(fused.input) == ["h", "b0"] and fused.domain == "katz"
        assert helper.get_attribute_value(fused.attribute[0]) == pytest.approx(amax["ff.2.weight"] / 448, rel=1e-6)
        assert "gg" not in {v.name for v in m.graph.value_info}
    onnx.checker.check_model(m, full_check=True)
    f = ff_feeds(11)
    want = ReferenceEvaluator(orig, new_ops=OPS).run(["y"], f)[0].astype(np.float32)
    got = ReferenceEvaluator(m, new_ops=OPS).run(["y"], f)[0].astype(np.float32)
    err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert 1e-3 < err < 0.08, err


def ln_graph(skip: bool) -> onnx.ModelProto:
    """A block's norm as ONNX Runtime's fusions leave it: SkipLayerNormalization (its sum the next
    residual, a graph output here) or LayerNormalization, read by the Q, K, V projections."""
    f16 = TensorProto.FLOAT16
    if skip:
        n = [helper.make_node("SkipLayerNormalization", ["x", "r", "gamma", "beta", "bias"], ["ln", "", "", "sum"],
                              domain="com.microsoft", name="norm", epsilon=1e-5)]
    else:
        n = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="norm", axis=-1, epsilon=1e-5)]
    outs = [helper.make_tensor_value_info("sum", f16, ["batch", S, D])] if skip else []
    for p in "qkv":
        w = f"attn.to_{p}.weight"
        n.append(helper.make_node("Transpose", [w], [w + "_t"], name=w + "/Transpose", perm=[1, 0]))
        n.append(helper.make_node("MatMul", ["ln", w + "_t"], [p], name=w + "/MatMul"))
        outs.append(helper.make_tensor_value_info(p, f16, ["batch", S, D]))
    rng = np.random.default_rng(5)
    inits = [onnx.numpy_helper.from_array((rng.standard_normal(D) * k + o).astype(np.float16), name)
             for name, k, o in (("gamma", 0.3, 1.0), ("beta", 0.1, 0.0), ("bias", 0.5, 0.0))]
    inputs = [helper.make_tensor_value_info("x", f16, ["batch", S, D]), helper.make_tensor_value_info("r", f16, ["batch", S, D])]
    inputs += [helper.make_tensor_value_info(f"attn.to_{p}.weight", f16, [D, D]) for p in "qkv"]
    g = helper.make_graph(n, "ln", inputs, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("skip", [True, False])
def test_layer_norm_quantized_as_it_is_made(skip):
    f = feeds(seed=7)
    f = {"x": f["x"], "r": feeds(seed=8)["x"], **{k: v for k, v in f.items() if k.startswith("attn.to_") and k[8] in "qkv"}}
    orig = ln_graph(skip)
    res = ReferenceEvaluator(orig, new_ops=OPS).run(None, f, intermediate=True)
    amax = {f"attn.to_{p}.weight": float(np.abs(res["ln"].astype(np.float32)).max()) for p in "qkv"}
    m, stats = fp8_rewrite.rewrite(ln_graph(skip), amax, set(amax))
    assert stats["rewritten"] == 3 and stats["layer_norm_fused"] == 1 and stats["quantize"] == 0
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert ops["Fp8LayerNorm"] == 1 and ops["Fp8Quantize"] == 0 and ops["Fp8MatMul"] == 3
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 0
    ln = next(n for n in m.graph.node if n.op_type == "Fp8LayerNorm")
    a = {x.name: helper.get_attribute_value(x) for x in ln.attribute}
    assert a["epsilon"] == pytest.approx(1e-5) and a["scale"] == pytest.approx(amax["attn.to_q.weight"] / 448, rel=1e-6)
    if skip:
        assert list(ln.input) == ["x", "r", "gamma", "beta", "bias"] and list(ln.output)[1:] == ["sum"]
    else:
        assert list(ln.input) == ["x", "", "gamma", "beta"] and len(ln.output) == 1
    onnx.checker.check_model(m, full_check=True)
    g = feeds(batch=3, seed=11)
    g = {"x": g["x"], "r": feeds(batch=3, seed=12)["x"], **{k: f[k] for k in f if k.startswith("attn")}}
    want = ReferenceEvaluator(orig, new_ops=OPS).run(None, g)
    got = ReferenceEvaluator(m, new_ops=OPS).run(None, g)
    for name, w, o in zip([o.name for o in orig.graph.output], want, got):
        w, o = w.astype(np.float32), o.astype(np.float32)
        err = float(np.linalg.norm(o - w) / np.linalg.norm(w))
        if name == "sum":
            assert err == 0  # the residual stays fp16
        else:
            assert 1e-3 < err < 0.08, (name, err)


def test_no_fuse_keeps_every_quantize():
    amax = {f"attn.to_{p}.weight": 4.0 for p in "qkv"}
    m, stats = fp8_rewrite.rewrite(ln_graph(True), amax, set(amax), fuse=False)
    assert stats["layer_norm_fused"] == 0 and stats["quantize"] == 1
    assert collections.Counter(n.op_type for n in m.graph.node)["SkipLayerNormalization"] == 1


def test_layer_norm_kept_where_its_statistics_are_read():
    m = ln_graph(True)
    norm = m.graph.node[0]
    norm.output[1] = "mean"
    m.graph.output.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))
    amax = {f"attn.to_{p}.weight": 4.0 for p in "qkv"}
    m, stats = fp8_rewrite.rewrite(m, amax, set(amax))
    assert stats["layer_norm_fused"] == 0 and stats["quantize"] == 1


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
    quant = [n for n in m.graph.node if n.op_type in ("Fp8Quantize", "Fp8LayerNorm", "Fp8BiasSplitGelu")]
    norms = [n for n in quant if n.op_type == "Fp8LayerNorm"]
    assert len(fp8) == len(weights)
    assert len({q.output[0] for q in quant}) == len(quant)  # one per activation
    assert len(quant) < len(fp8)  # Q, K and V share theirs
    assert norms  # the transformers' norms quantize as they normalise
    assert all({a.name: helper.get_attribute_value(a) for a in q.attribute}["scale"] > 0 for q in quant)
    # all else as it was: the source's other nodes (less the norms now fused), inputs and outputs
    # (the source is the step rewrite's: its GEGLUs and plain layer norms are katz's already, and
    # those the fp8 rewrite fused are katz nodes on both sides)
    skip_ln = sum(1 for n in norms if len(n.input) > 1 and n.input[1])
    gone = {"MatMul": len(weights), "Transpose": len(weights), "SkipLayerNormalization": skip_ln}
    before = collections.Counter(n.op_type for n in src.graph.node if n.domain != "katz")
    after = collections.Counter(n.op_type for n in m.graph.node if n.domain != "katz")
    assert after == before - collections.Counter(gone)
    katz_src = collections.Counter(n.op_type for n in src.graph.node if n.domain == "katz")
    katz_m = collections.Counter(n.op_type for n in m.graph.node if n.domain == "katz")
    assert katz_m["LayerNorm"] + len(norms) - skip_ln == katz_src["LayerNorm"]
    assert katz_m["BiasSplitGelu"] + katz_m["Fp8BiasSplitGelu"] == katz_src["BiasSplitGelu"]
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
    # the text tokens' keys and values run once per job, in the prelude (fp16), not in the step graphs
    assert manifest["unet"]["prelude"] == "unet_prelude.onnx"
    hoisted = {i.name for i in onnx.load(str(bundle / "unet_prelude.onnx")).graph.input} & set(amax)
    assert hoisted and all(".attn2.to_k." in w or ".attn2.to_v." in w for w in hoisted)
    n = len(amax) - len(hoisted)
    assert manifest["fp8"] == {"unet_encoder": "unet_encoder.fp8.onnx", "unet_decoder": "unet_decoder.fp8.onnx",
                               "amax": "fp8_amax.json", "rewritten": n, "skipped": 0}
    for g, ws in unet.items():
        check_fp8_graph(bundle, g, ws - hoisted)
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


def test_katz_layer_norm_of_the_step_rewrite_is_quantized_as_it_is_made():
    """katz.LayerNorm (tools/step_rewrite.py: the bias add before it folded in, the sum its second
    output) fuses with its quantize as ONNX Runtime's layer norms do, keeping the sum."""
    m = ln_graph(False)
    norm = m.graph.node[0]
    m.graph.node.remove(norm)
    m.graph.node.insert(0, helper.make_node("LayerNorm", ["x", "", "gamma", "beta", "bias"], ["ln", "sum"], domain="katz",
                                            name="norm", epsilon=1e-6))
    m.graph.output.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT16, ["batch", S, D]))
    amax = {f"attn.to_{p}.weight": 4.0 for p in "qkv"}
    m, stats = fp8_rewrite.rewrite(m, amax, set(amax))
    assert stats["layer_norm_fused"] == 1 and stats["quantize"] == 0
    ln = next(n for n in m.graph.node if n.op_type == "Fp8LayerNorm")
    assert list(ln.input) == ["x", "", "gamma", "beta", "bias"] and list(ln.output)[1:] == ["sum"]
    assert {x.name: helper.get_attribute_value(x) for x in ln.attribute}["epsilon"] == pytest.approx(1e-6)
    assert not any(n.op_type == "LayerNorm" for n in m.graph.node)
