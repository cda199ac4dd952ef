"""The step rewrite of GPU bundles (tools/step_rewrite.py), on small graphs of the fused GPU
operators (structure only: their CUDA kernels cannot run here; the GPU sitting compares whole
images, `tools/device/gpu-path.sh rewrite`):

    .katz/py/bin/python -m pytest -q tools/test_step_rewrite.py          (run by `make test`)

  - BiasSplitGelu becomes katz's twin (same inputs and outputs) and the graph imports the katz domain;
  - a layer norm over the last axis becomes katz's, with the bias add before it folded in (its sum
    still made for the residual's readers); one over another axis or of a width katz's kernel does
    not take is left alone;
  - a convolution read only by a SkipGroupNorm gives it its bias; two such convolutions give the
    sum of theirs (read from external data where the weights live there); a convolution with other
    readers, a SkipGroupNorm with a bias of its own and a plain GroupNorm are left alone;
  - a second rewrite changes nothing, and a bundle's graphs (with their deterministic twins) are
    rewritten in place, their external data untouched.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import step_rewrite  # noqa: E402

MS = "com.microsoft"
C = 64


def _graph() -> onnx.ModelProto:
    """x ─conv1(b1)─┐
       x ─conv2(b2)─┴─SkipGroupNorm─▶ y, s          (both biases fold: b1 + b2)
       y ─conv3(b3)─▶ SkipGroupNorm(skip = temb) ─▶ y2  (b3 folds)
       y2 ─conv4(b4)─▶ GroupNorm, and a Transpose       (conv4 has two readers: stays)
       s ─conv5(b5)─▶ SkipGroupNorm(bias = b6)          (a bias there already: stays)
       f ─BiasSplitGelu─▶ g"""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def init(name, shape, dtype=np.float16):
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), name))
        return name

    def conv(i, x, out):
        nodes.append(helper.make_node("NhwcConv", [x, init(f"w{i}", (C, C, 3, 3)), init(f"b{i}", (C,))], [out],
                                      domain=MS, name=f"conv{i}", pads=[1, 1, 1, 1]))

    g, b = init("gamma", (C,), np.float32), init("beta", (C,), np.float32)

    def sgn(name, x, skip, outs, bias=""):
        nodes.append(helper.make_node("SkipGroupNorm", [x, g, b, skip] + ([bias] if bias else []), outs, domain=MS,
                                      name=name, groups=32, activation=1, epsilon=1e-5))

    conv(1, "x", "c1")
    conv(2, "x", "c2")
    sgn("sgn1", "c1", "c2", ["y", "s"])
    conv(3, "y", "c3")
    sgn("sgn2", "c3", "temb", ["y2"])
    conv(4, "y2", "c4")
    nodes.append(helper.make_node("GroupNorm", ["c4", g, b], ["gn"], domain=MS, groups=32, activation=1, epsilon=1e-5))
    nodes.append(helper.make_node("Transpose", ["c4"], ["t4"], perm=[0, 3, 1, 2]))
    conv(5, "s", "c5")
    sgn("sgn3", "c5", "s", ["y3"], bias=init("b6", (C,)))
    nodes.append(helper.make_node("BiasSplitGelu", ["f", init("fb", (2 * 2560,))], ["ge"], domain=MS))
    # proj_in: X·W, + bias, then the layer norm; the sum is also the residual (read on)
    nodes.append(helper.make_node("Add", [init("pb", (C,)), "p"], ["ps"]))
    nodes.append(helper.make_node("LayerNormalization", ["ps", init("lg", (C,)), init("lb", (C,))], ["pn"],
                                  name="ln1", axis=-1, epsilon=1e-5))
    nodes.append(helper.make_node("Add", ["pn", "ps"], ["res"]))
    # a plain one (no bias add before it), and one over another axis (left to ONNX Runtime)
    nodes.append(helper.make_node("LayerNormalization", ["res", "lg", "lb"], ["pn2"], name="ln2", epsilon=1e-6))
    nodes.append(helper.make_node("LayerNormalization", ["p", "lg2", "lb2"], ["pn3"], name="ln3", axis=1))
    # and one katz's kernel does not take (a width not a multiple of 8)
    nodes.append(helper.make_node("LayerNormalization", ["q", init("lg3", (12,)), "lg3"], ["pn4"], name="ln4"))
    init("lg2", (16,))
    init("lb2", (16,))
    h = TensorProto.FLOAT16
    graph = helper.make_graph(
        nodes, "step",
        [helper.make_tensor_value_info("x", h, [2, 8, 8, C]), helper.make_tensor_value_info("temb", h, [2, 1, 1, C]),
         helper.make_tensor_value_info("f", h, [2, 16, 2 * 2560]), helper.make_tensor_value_info("p", h, [2, 16, C]),
         helper.make_tensor_value_info("q", h, [2, 16, 12])],
        [helper.make_tensor_value_info(n, h, [2, 8, 8, C]) for n in ("y", "s", "y2", "gn", "y3")]
        + [helper.make_tensor_value_info("t4", h, [2, C, 8, 8]), helper.make_tensor_value_info("ge", h, [2, 16, 2560])]
        + [helper.make_tensor_value_info(n, h, [2, 16, C]) for n in ("pn2", "pn3")]
        + [helper.make_tensor_value_info("pn4", h, [2, 16, 12])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])


def _node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def _init(m, name, base=None):
    return step_rewrite._array(next(t for t in m.graph.initializer if t.name == name), base)


def test_the_geglu_becomes_katz_twin_and_biases_fold():
    m = _graph()
    b1, b2, b3 = (numpy_helper.to_array(t) for t in m.graph.initializer if t.name in ("b1", "b2", "b3"))
    assert step_rewrite.rewrite(m) == {"BiasSplitGelu": 1, "LayerNorm": 2, "conv biases": 3}
    geglu = next(n for n in m.graph.node if n.op_type == "BiasSplitGelu")
    assert (geglu.domain, list(geglu.input), list(geglu.output)) == ("katz", ["f", "fb"], ["ge"])
    assert any(o.domain == "katz" and o.version == 1 for o in m.opset_import)
    # conv1 and conv2 lost their biases into sgn1's, summed once
    assert [len(_node(m, f"conv{i}").input) for i in (1, 2, 3, 4, 5)] == [2, 2, 2, 3, 3]
    s1 = _node(m, "sgn1").input[4]
    np.testing.assert_array_equal(_init(m, s1), (b1.astype(np.float32) + b2.astype(np.float32)).astype(np.float16))
    assert _node(m, "sgn2").input[4] == "b3" and np.array_equal(_init(m, "b3"), b3)
    assert _node(m, "sgn3").input[4] == "b6"  # its own bias stays, and conv5 keeps its
    # the bias add folds into katz's layer norm, whose second output is the sum the residual reads
    ln = [n for n in m.graph.node if n.op_type == "LayerNorm"]
    assert [(n.domain, list(n.input), list(n.output)) for n in ln] == [
        ("katz", ["p", "", "lg", "lb", "pb"], ["pn", "ps"]), ("katz", ["res", "", "lg", "lb", ""], ["pn2"])]
    assert [helper.get_attribute_value(n.attribute[0]) for n in ln] == [np.float32(1e-5), np.float32(1e-6)]
    assert not any(n.op_type == "Add" and "pb" in n.input for n in m.graph.node), "the bias add is gone"
    assert [n.name for n in m.graph.node if n.op_type == "LayerNormalization"] == ["ln3", "ln4"]
    names = {t.name for t in m.graph.initializer}
    assert "b1" not in names and "b2" not in names, "the summed biases are gone"
    onnx.checker.check_model(m)
    assert step_rewrite.rewrite(m) == {"BiasSplitGelu": 0, "LayerNorm": 0, "conv biases": 0}


def test_a_bundle_is_rewritten_in_place_with_its_external_data(tmp_path):
    b = tmp_path / "bundle"
    b.mkdir()
    for name in ("unet_encoder.onnx", "unet_decoder.onnx", "unet_encoder.exact.onnx"):
        onnx.save(_graph(), str(b / name), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=name + ".data", size_threshold=0)
    (b / "bundle.json").write_text(json.dumps({
        "kind": "base", "unet": {"encoder": "unet_encoder.onnx", "decoder": "unet_decoder.onnx"},
        "exact": {"unet_encoder": "unet_encoder.exact.onnx", "unet_decoder": "unet_decoder.onnx"}}))
    data = (b / "unet_encoder.onnx.data").read_bytes()
    done = step_rewrite.rewrite_bundle(b)
    assert sorted(done) == ["unet_decoder.onnx", "unet_encoder.exact.onnx", "unet_encoder.onnx"]
    assert (b / "unet_encoder.onnx.data").read_bytes() == data, "the weights file is left as it was"
    m = onnx.load(str(b / "unet_encoder.onnx"))  # with its external data
    want = _graph()
    b1, b2 = (numpy_helper.to_array(t).astype(np.float32) for t in want.graph.initializer if t.name in ("b1", "b2"))
    np.testing.assert_array_equal(_init(m, _node(m, "sgn1").input[4]), (b1 + b2).astype(np.float16))
    np.testing.assert_array_equal(_init(m, "w1"), numpy_helper.to_array(want.graph.initializer[2]))
    assert step_rewrite.rewrite_bundle(b) == {}
    # a ControlNet bundle: its one graph
    cn = tmp_path / "cn"
    cn.mkdir()
    onnx.save(_graph(), str(cn / "controlnet.onnx"))
    (cn / "bundle.json").write_text(json.dumps({"kind": "controlnet", "graph": "controlnet.onnx"}))
    assert list(step_rewrite.rewrite_bundle(cn)) == ["controlnet.onnx"]
    shutil.rmtree(tmp_path)
