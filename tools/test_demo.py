"""`katz demo` makes a picture that shows what it asked for: the trained tiny family's
base model, ControlNet and pastel LoRA, read back by the shapes judge (tools/shapes/judge.onnx, the
committed judge.pt exported; no torch), the ControlNet's edges and the LoRA's style score.

Run by `make test` (after the Rust build): .katz/py/bin/python -m pytest tools/test_demo.py
`.katz/py/bin/python tools/test_demo.py` writes the demo's conditioning edges (bundles/shapes/examples).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from shapes.dataset import Obj, _render, edge_iou, edge_map, style_score  # noqa: E402
from shapes.reading import OnnxJudge, reads_as  # noqa: E402

KATZ = Path(os.environ.get("KATZ_BIN", ROOT / "target" / "release" / "katz"))
PROMPT = "a red circle above a blue square on a white background"
EDGES = ROOT / "bundles" / "shapes" / "examples" / "red-circle-above-blue-square-edges.png"


def layout() -> tuple[np.ndarray, np.ndarray]:
    """The demo's layout as the dataset draws it: (image, edges) at 128²."""
    objs = [Obj("circle", "red", (0.5, 0.27), 0.32), Obj("square", "blue", (0.5, 0.73), 0.32)]
    image, _mask, edges = _render(objs, "white", 128)
    return image, edges


def test_the_committed_condition_is_the_layouts_edges():
    _, edges = layout()
    assert np.array_equal(np.asarray(Image.open(EDGES).convert("RGB")), edges)


def test_the_judge_reads_the_layout_itself():
    image, edges = layout()
    assert reads_as(PROMPT, OnnxJudge().predict([image])[0])["prompt"]
    assert edge_iou(edge_map(image), edges) > 0.7


def test_demo_shows_its_prompt_controlnet_and_lora(tmp_path):
    out = tmp_path / "demo.png"
    r = subprocess.run([str(KATZ), "demo", "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    im = np.asarray(Image.open(out).convert("RGB"))
    assert im.shape == (128, 128, 3)
    seen = OnnxJudge().predict([im])[0]
    read = reads_as(PROMPT, seen)
    objects = [(o["shape"], o["colour"]) for o in seen["objects"]]
    # the prompt: a red circle and a blue square, the circle above, on white
    assert read["prompt"], f"the judge reads {objects} on {seen['background']}: {read}"
    # the ControlNet: the picture's edges follow the condition's (another layout's image scores
    # 0.07 on average, at most 0.36: tools/shapes/dataset.py)
    _, edges = layout()
    iou = edge_iou(edge_map(im), edges)
    assert iou > 0.4, f"edge IoU {iou:.2f} against the ControlNet's condition"
    # the LoRA: a pastel palette (the base model's own pictures score 0.0)
    pastel = style_score(im, "pastel")
    assert pastel > 0.5, f"pastel style score {pastel:.2f}"


if __name__ == "__main__":
    # (re)writes the committed condition: python3 tools/test_demo.py  (numpy + pillow)
    Image.fromarray(layout()[1]).save(EDGES)
    print(f"wrote {EDGES}")
