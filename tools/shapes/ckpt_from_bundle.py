#!/usr/bin/env python3
"""Rebuilds the trained family's diffusers checkpoint from its committed ONNX bundles.

    python tools/shapes/ckpt_from_bundle.py --out /tmp/tiny-ckpt      (the exporter's venv: tools/export.sh)

The checkpoint (tools/train_tiny.py's output) stays out of git; the bundles in bundles/shapes hold
every trained weight. This script gets them back into PyTorch modules, so that the exporter can
make other bundles of the same weights — the fp16 GPU bundle of the quality report (`export_bundle.py
--checkpoint OUT --gpu`) — without training again:

    family config (train_tiny.family_config) ──▶ modules with distinct random values ──▶ exporter ──▶ probe bundle
    probe bundle's initializer / weight input N  ==  module parameter P (flattened, or transposed)  ⇒  N ↦ P
    committed bundle's N ──▶ P  ──▶ save_pretrained (text encoders, UNet, VAE, ControlNet) + LoRAs + tokenizers
    check: the rebuilt checkpoint exported again gives the committed bundle, tensor for tensor

The probe's values are drawn so that no two parameters share one, so value equality names the
parameter behind every folded tensor (the TorchScript exporter renames transposed Linear weights
`onnx::MatMul_N`). Tensors that match no parameter must be structural constants, equal in the probe
and the committed bundle; anything else is an error. Parameters no graph uses keep their probe values
(the exporter cannot see them either) and are counted in the output.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).resolve().parents[1]
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))

import export_bundle as eb  # noqa: E402
import train_tiny as tt  # noqa: E402

# bundle graph ─▶ the module whose parameters it holds
GRAPHS = {
    "text_encoder.onnx": "text_encoder",
    "text_encoder_2.onnx": "text_encoder_2",
    "unet_encoder.onnx": "unet",
    "unet_decoder.onnx": "unet",
    "vae_decoder.onnx": "vae",
}


def load_tensors(bundle: Path, cn_bundle: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every initializer of every graph, and the weight inputs (weights.safetensors), by module;
    each graph's ONNX model under `models`."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    out: dict[str, dict] = {"models": {}}
    for graph, module in [*GRAPHS.items(), ("controlnet.onnx", "controlnet")]:
        path = (cn_bundle if module == "controlnet" else bundle) / graph
        m = onnx.load(str(path))
        out["models"][graph] = m
        tensors = out.setdefault(module, {})
        for init in m.graph.initializer:
            tensors[f"{graph}:{init.name}"] = numpy_helper.to_array(init)
        # the exporter merges initializers of equal value (a trained model's untouched LayerNorm
        # biases are all zeros) and names the others through Identity nodes: those names too
        for node in m.graph.node:
            if node.op_type == "Identity" and f"{graph}:{node.input[0]}" in tensors:
                tensors[f"{graph}:{node.output[0]}"] = tensors[f"{graph}:{node.input[0]}"]
    manifest = json.loads((bundle / "bundle.json").read_text())
    for name, value in load_file(str(bundle / manifest["weights"]["file"])).items():
        out["unet"][f"weights:{name}"] = value
    cn_manifest = json.loads((cn_bundle / "bundle.json").read_text())
    if "weights" in cn_manifest:  # ControlNet bundles whose Linear weights are inputs
        for name, value in load_file(str(cn_bundle / cn_manifest["weights"]["file"])).items():
            out["controlnet"][f"weights:{name}"] = value
    return out


def distinct_values(modules: dict[str, torch.nn.Module], seed: int):
    """Every parameter to values no other parameter has (seeded normal, scaled per tensor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, m in enumerate(modules.values()):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (i + 1) * 1e-3)


def save_checkpoint(modules, tok_file: Path, scaling_factor: float, out: Path):
    from diffusers import StableDiffusionXLPipeline

    out.mkdir(parents=True, exist_ok=True)
    modules["vae"].register_to_config(scaling_factor=scaling_factor)
    hf = eb.hf_tokenizer(tok_file)
    sched = tt.Run.scheduler(None)
    pipe = StableDiffusionXLPipeline(vae=modules["vae"], text_encoder=modules["text_encoder"],
                                     text_encoder_2=modules["text_encoder_2"], tokenizer=hf, tokenizer_2=hf,
                                     unet=modules["unet"], scheduler=sched, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.save_pretrained(str(out))
    modules["controlnet"].save_pretrained(str(out / "controlnet"))
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copy(tok_file, out / sub / "tokenizer.json")  # the builder's own file, as train_tiny writes it


def build(tok_file: Path, seed: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    cfg = tt.family_config()
    cfg["vocab_size"] = len(tok.get_vocab())  # as train_tiny sizes the text encoders
    te, te2, unet, vae, cn = eb.build_models(cfg, seed, None, tt.token_ids(tok))
    return {"text_encoder": te, "text_encoder_2": te2, "unet": unet, "vae": vae, "controlnet": cn}


def export(ckpt: Path, out: Path, like: dict, like_cn: dict):
    """The exporter on `ckpt`, with the graph inputs of the bundle whose manifest is `like`: the UNet's
    LoCon targets as inputs only where it has `weights.conv_graphs`, the text encoders' weights only
    where its weight map has them (bundles exported before keep them as initializers)."""
    old = [*([] if "conv_graphs" in like["weights"] else ["--no-locon-inputs"]),
           *([] if any(e["graph"].startswith("text_encoder") for e in like["weights"]["map"].values())
             else ["--no-text-encoder-inputs"]),
           *([] if "weights" in like_cn else ["--no-controlnet-inputs"])]
    subprocess.run([sys.executable, str(TOOLS / "export_bundle.py"), "--config", "tiny", "--checkpoint", str(ckpt),
                    "--out", str(out / "b"), "--no-check", "--no-references", *old],
                   check=True, stdout=subprocess.DEVNULL)
    return out / "b", out / "b-controlnet"


def mapping(probe: dict[str, dict[str, np.ndarray]], modules) -> tuple[dict, dict, int]:
    """Tensor key ─▶ (module, parameter, transposed) by value; keys matching none; parameters unused."""
    found, constants, used = {}, {}, set()
    for module, tensors in probe.items():
        params = {n: p.detach().numpy() for n, p in modules[module].named_parameters()}
        by_first: dict[float, list[str]] = {}
        for n, v in params.items():
            for key in {float(v.reshape(-1)[0]), float(v.T.reshape(-1)[0]) if v.ndim == 2 else None} - {None}:
                by_first.setdefault(key, []).append(n)
        for key, t in tensors.items():
            hit = None
            if t.dtype == np.float32 and t.size > 0:
                for n in by_first.get(float(t.reshape(-1)[0]), []):
                    v = params[n]
                    if v.size != t.size:
                        continue
                    if np.array_equal(v.reshape(-1), t.reshape(-1)):
                        hit = (module, n, False)
                    elif v.ndim == 2 and np.array_equal(v.T.reshape(-1), t.reshape(-1)):
                        hit = (module, n, True)
                    if hit:
                        break
            if hit:
                found[key] = hit
                used.add((module, hit[1]))
            else:
                constants[key] = t
    unused = sum(1 for m, mod in modules.items() for n, _ in mod.named_parameters() if (m, n) not in used)
    return found, constants, unused


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=REPO / "bundles" / "shapes" / "shapes-sdxl")
    ap.add_argument("--controlnet", type=Path, default=None, help="default: BUNDLE-controlnet")
    ap.add_argument("--loras", type=Path, default=None, help="LoRA files to copy into OUT/loras (default: BUNDLE/../loras)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=99)
    a = ap.parse_args(argv)
    cn_bundle = a.controlnet or a.bundle.parent / (a.bundle.name + "-controlnet")
    loras = a.loras or a.bundle.parent / "loras"
    tok_file = a.bundle / "tokenizer.json"
    manifest = json.loads((a.bundle / "bundle.json").read_text())
    cn_manifest = json.loads((cn_bundle / "bundle.json").read_text())
    committed = load_tensors(a.bundle, cn_bundle)

    with tempfile.TemporaryDirectory(prefix="ckpt-probe-") as tmp:
        tmp = Path(tmp)
        modules = build(tok_file, a.seed)
        distinct_values(modules, a.seed)
        save_checkpoint(modules, tok_file, manifest["scaling_factor"], tmp / "ckpt")
        probe = load_tensors(*export(tmp / "ckpt", tmp, manifest, cn_manifest))
        del probe["models"]
        want = committed
        for module, tensors in probe.items():
            missing = set(tensors) - set(want[module])
            if missing:
                sys.exit(f"the probe export has {module} tensors the bundle lacks: {sorted(missing)[:8]}")
        found, constants, unused = mapping(probe, modules)
    bad = [k for k, v in constants.items() if not np.array_equal(want[_module_of(k, want)][k], v)]
    if bad:
        sys.exit(f"{len(bad)} tensors are neither a parameter nor a constant of the export: {bad[:8]}")

    # the committed values into the parameters
    with torch.no_grad():
        params = {m: dict(mod.named_parameters()) for m, mod in modules.items()}
        for key, (module, name, transposed) in found.items():
            v = want[module][key]
            p = params[module][name]
            t = torch.from_numpy(np.ascontiguousarray(v.reshape(p.T.shape if transposed else p.shape)))
            p.copy_(t.T if transposed else t)
    save_checkpoint(modules, tok_file, manifest["scaling_factor"], a.out)
    if loras.is_dir():
        shutil.copytree(loras, a.out / "loras", dirs_exist_ok=True)

    # check: exported again, the checkpoint gives the committed tensors
    with tempfile.TemporaryDirectory(prefix="ckpt-check-") as tmp:
        again = load_tensors(*export(a.out, Path(tmp), manifest, cn_manifest))
    worst = 0.0
    for module, tensors in committed.items():
        if module == "models":
            continue
        for key, v in tensors.items():
            w = again[module].get(key)
            if w is None or w.shape != v.shape:
                sys.exit(f"re-exported, {key} is missing or of another shape")
            if v.dtype.kind == "f":
                worst = max(worst, float(np.abs(w.astype(np.float64) - v).max()) if v.size else 0.0)
            elif not np.array_equal(w, v):
                sys.exit(f"re-exported {key} differs")
    n = sum(len(t) for m, t in committed.items() if m != "models")
    print(f"checkpoint: {a.out} — {len(found)} of {n} bundle tensors are parameters ({len(constants)} constants), "
          f"{unused} parameters unused by the graphs; re-exported, the largest difference is {worst:.1e}")
    if worst > 0:
        sys.exit("the rebuilt checkpoint does not give the committed bundle exactly")


def _module_of(key: str, tensors: dict) -> str:
    return next(m for m, t in tensors.items() if key in t)


if __name__ == "__main__":
    sys.exit(main())
