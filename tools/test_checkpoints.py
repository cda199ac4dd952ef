"""The exporter's checkpoint inputs (docs/bundles.md, "Checkpoints"), in the exporter's venv:

    .venv-tools/bin/python -m pytest -q tools/test_checkpoints.py        (make test-export; ~1 min)

On the fixtures of tests/data/checkpoints/ (tools/make_checkpoint_fixtures.py: diffusers'
save_pretrained and its SGM conversion script):
  - the single-file SDXL checkpoint (.safetensors and .ckpt) and the diffusers directory it was
    converted from export to the same tensors, and the .safetensors export is the committed
    bundles/tiny-ckpt (whose parity with diffusers' from_single_file tests/parity.rs checks);
  - the ControlNet from a diffusers directory and from its single file export the same graph;
  - an SD 1.x single file, a truncated safetensors header, a truncated .ckpt, a ControlNet given as
    the base (and the reverse) are refused before any export work, naming the file and the family.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
DATA = REPO / "tests" / "data" / "checkpoints"
sys.path.insert(0, str(TOOLS))

import checkpoints  # noqa: E402

GRAPHS = ["text_encoder.onnx", "text_encoder_2.onnx", "unet_encoder.onnx", "unet_decoder.onnx", "vae_decoder.onnx"]


def export(tmp: Path, checkpoint, *extra, check=False) -> subprocess.CompletedProcess:
    out = tmp / "bundle"
    args = [sys.executable, str(TOOLS / "export_bundle.py"), "--config", "tiny", "--checkpoint", str(checkpoint),
            "--name", "tiny-ckpt", "--out", str(out), *map(str, extra)]
    if not check:
        args.append("--no-check")
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO)


def tensors(bundle: Path, graphs) -> dict[str, np.ndarray]:
    """Every initializer of the graphs and the weight inputs, by graph and name."""
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    out = {}
    for g in graphs:
        for t in onnx.load(str(bundle / g)).graph.initializer:
            out[f"{g}:{t.name}"] = numpy_helper.to_array(t)
    if (bundle / "weights.safetensors").exists():
        out.update({f"weights:{k}": v for k, v in load_file(str(bundle / "weights.safetensors")).items()})
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.fixture(scope="module")
def from_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("file")
    r = export(tmp, DATA / "tiny-sdxl.safetensors", "--controlnet-checkpoint",
               DATA / "tiny-sdxl-controlnet" / "diffusion_pytorch_model.safetensors", check=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SDXL, single-file" in r.stdout
    return tmp / "bundle"


def test_single_file_export_is_the_committed_bundle(from_file):
    committed = REPO / "bundles" / "tiny-ckpt"
    assert_same(tensors(from_file, GRAPHS), tensors(committed, GRAPHS))
    assert (from_file / "bundle.json").read_text() == (committed / "bundle.json").read_text()
    assert (from_file / "tokenizer.json").read_bytes() == (committed / "tokenizer.json").read_bytes()
    cn, committed_cn = from_file.parent / "bundle-controlnet", REPO / "bundles" / "tiny-ckpt-controlnet"
    assert_same(tensors(cn, ["controlnet.onnx"]), tensors(committed_cn, ["controlnet.onnx"]))


@pytest.mark.parametrize("source", ["tiny-sdxl.ckpt", "tiny-sdxl"])
def test_ckpt_and_diffusers_directory_give_the_same_bundle(source, from_file, tmp_path):
    # the directory is what the single file was converted from; its ControlNet as a directory too
    extra = ["--controlnet-checkpoint", DATA / "tiny-sdxl-controlnet"] if source == "tiny-sdxl" else []
    r = export(tmp_path, DATA / source, *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("diffusers-dir" if source == "tiny-sdxl" else "single-file") in r.stdout
    assert_same(tensors(tmp_path / "bundle", GRAPHS), tensors(from_file, GRAPHS))
    if extra:
        assert_same(tensors(tmp_path / "bundle-controlnet", ["controlnet.onnx"]),
                    tensors(from_file.parent / "bundle-controlnet", ["controlnet.onnx"]))


def truncated(tmp: Path, name: str, n: int) -> Path:
    p = tmp / name
    p.write_bytes((DATA / name).read_bytes()[:n])
    return p


@pytest.mark.parametrize("case", ["sd15", "truncated-header", "truncated-data", "truncated-ckpt", "controlnet-as-base",
                                  "base-as-controlnet", "missing"])
def test_refused_before_any_export(case, tmp_path):
    base, extra = DATA / "tiny-sdxl.safetensors", []
    if case == "sd15":
        base, want = DATA / "tiny-sd15.safetensors", "detected Stable Diffusion 1.x"
    elif case == "truncated-header":
        base, want = truncated(tmp_path, "tiny-sdxl.safetensors", 1000), "corrupt or truncated safetensors file"
    elif case == "truncated-data":
        base, want = truncated(tmp_path, "tiny-sdxl.safetensors", 200_000), "corrupt or truncated safetensors file"
    elif case == "truncated-ckpt":
        base, want = truncated(tmp_path, "tiny-sdxl.ckpt", 100_000), "not a readable PyTorch checkpoint"
    elif case == "controlnet-as-base":
        base = DATA / "tiny-sdxl-controlnet" / "diffusion_pytorch_model.safetensors"
        want = "detected an SDXL ControlNet"
    elif case == "base-as-controlnet":
        extra, want = ["--controlnet-checkpoint", DATA / "tiny-sdxl.safetensors"], "not a ControlNet (detected SDXL"
    else:
        base, want = tmp_path / "nothing.safetensors", "no such file or directory"
    r = export(tmp_path, base, *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    bad = extra[1] if extra else base
    assert f"{bad}: " in r.stderr and want in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "bundle").exists(), "export work started"


def test_sd3_and_refiner_keys_are_named():
    """diffusers' own detection keys (CHECKPOINT_KEY_NAMES) with SD3's and the refiner's shapes: no
    reference tool writes a small SD3 single file, so this checks the classification on key names."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    S = checkpoints._Shape
    sd3 = {CHECKPOINT_KEY_NAMES["sd3"][1]: S((9216,)), "model.diffusion_model.pos_embed": S((1, 36864, 1536))}
    assert checkpoints.family_of(sd3) == ("Stable Diffusion 3", "sd3")
    refiner = {CHECKPOINT_KEY_NAMES["xl_refiner"]: S((1280,))}
    assert checkpoints.family_of(refiner)[0] == "SDXL refiner"


def test_safetensors_header_of_every_fixture_reads():
    for f in ("tiny-sdxl.safetensors", "tiny-sd15.safetensors"):
        assert len(checkpoints.read_keys(DATA / f)) > 100
