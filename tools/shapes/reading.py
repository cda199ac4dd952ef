"""Reading a judge's output back into objects, and scoring it against captions — numpy only,
so that the judge also runs without torch, through ONNX Runtime (tools/shapes/judge.onnx).

    image ─▶ as_64 ─▶ judge (JudgeNet in torch, judge.py; or OnnxJudge here, the same weights
    exported by `judge.py export-onnx`) ─▶ raw heads {heat, shape, colour, offset, background}
          ─▶ decode: objectness peaks (3×3 local maxima > 0.5, at most 3) with shape, colour,
             center, 3×3 cell; background; relation of slot 0 to slot 1
          ─▶ score(predictions, captions): prompt accuracy and per-attribute accuracies

judge.py trains the net and re-exports these functions under its old names; the demo test
(tools/test_demo.py) uses OnnxJudge, whose venv (.katz/py) has onnxruntime, numpy and pillow.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shapes.dataset import BACKGROUND_NAMES, COLOUR_NAMES, SHAPES, cell_of, parse_caption

IMAGE_SIZE = 64
GRID = 8  # output cells per side (8 px each at 64²)
PEAK_THRESHOLD = 0.5
ONNX_PATH = Path(__file__).resolve().parent / "judge.onnx"


def as_64(im: np.ndarray) -> np.ndarray:
    """An image as (64, 64, 3) uint8: drops alpha, repeats gray, resizes other sizes (PIL BOX/bicubic)."""
    if im.dtype != np.uint8:
        im = np.clip(np.rint(im * 255.0 if im.max() <= 1.0 else im), 0, 255).astype(np.uint8)
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=2)
    im = im[..., :3]
    if im.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        from PIL import Image

        resample = Image.BOX if im.shape[0] > IMAGE_SIZE else Image.BICUBIC
        im = np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), resample))
    return im


def batch_64(images) -> np.ndarray:
    """(B, 64, 64, 3) uint8 from a list of images or such an array."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype == np.uint8 \
            and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3):
        return images
    return np.stack([as_64(np.asarray(im)) for im in images])


def relation_of(a: tuple[float, float], b: tuple[float, float]) -> str:
    """The relation of center a to center b by the dominant axis (image y grows downwards)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "left of" if dx < 0 else "right of"


def decode(raw: dict[str, np.ndarray], i: int) -> dict:
    """Image i of the raw heads as {"objects", "slots", "background", "relation"} (judge.predict)."""
    heat = 1 / (1 + np.exp(-raw["heat"][i]))
    pad = np.pad(heat, 1, constant_values=-1)
    neigh = np.max([pad[dy : dy + GRID, dx : dx + GRID] for dy in range(3) for dx in range(3)], axis=0)
    peaks = np.argwhere((heat >= neigh) & (heat > PEAK_THRESHOLD))
    peaks = sorted(peaks.tolist(), key=lambda rc: -heat[rc[0], rc[1]])[:3]
    objs = []
    for row, col in peaks:
        cx = (col + float(raw["offset"][i, 0, row, col])) / GRID
        cy = (row + float(raw["offset"][i, 1, row, col])) / GRID
        objs.append({"shape": SHAPES[int(raw["shape"][i, :, row, col].argmax())],
                     "colour": COLOUR_NAMES[int(raw["colour"][i, :, row, col].argmax())],
                     "center": (cx, cy), "cell": cell_of((cx, cy)), "p": float(heat[row, col])})
    objs.sort(key=lambda o: (o["cell"] // 3, o["center"][0], o["center"][1]))  # canonical: rows, then x
    slots = objs + [{"shape": "none", "colour": "none", "center": None, "cell": None, "p": 0.0}] * (3 - len(objs))
    rel = relation_of(objs[0]["center"], objs[1]["center"]) if len(objs) == 2 else None
    return {
        "objects": objs,
        "slots": slots,
        "background": BACKGROUND_NAMES[int(raw["background"][i].argmax())],
        "relation": rel,
    }


def match(asked: list[tuple[str, str]], objs: list[dict]) -> list[dict | None]:
    """For each asked (shape, colour), the predicted object that fits it best (both
    attributes > shape > colour), each used once."""
    free = list(objs)
    res: list[dict | None] = [None] * len(asked)
    for want_score in (2, 1):
        for j, (shape, colour) in enumerate(asked):
            if res[j] is not None:
                continue
            for o in free:
                score_ = (o["shape"] == shape) + (o["colour"] == colour)
                if score_ >= want_score:
                    res[j] = o
                    free.remove(o)
                    break
    return res


def reads_as(caption: str, p: dict) -> dict[str, bool]:
    """Which of the caption's attributes one prediction shows: count, objects (the set of
    (shape, colour)), shapes, colours, background, relation (True where the caption has none),
    and prompt (objects, background and relation all right)."""
    asked, bg, rel = parse_caption(caption)
    objs = p["objects"]
    r = {
        "count": len(objs) == len(asked),
        "objects": sorted((o["shape"], o["colour"]) for o in objs) == sorted(asked),
        "shapes": sorted(o["shape"] for o in objs) == sorted(a[0] for a in asked),
        "colours": sorted(o["colour"] for o in objs) == sorted(a[1] for a in asked),
        "background": p["background"] == bg,
        "relation": True,
    }
    if rel is not None:
        m = match(asked, objs)
        r["relation"] = m[0] is not None and m[1] is not None and relation_of(m[0]["center"], m[1]["center"]) == rel
    r["prompt"] = r["objects"] and r["background"] and r["relation"]
    return r


def score(preds: list[dict], caps: list[str]) -> dict:
    """Prompt accuracy and per-attribute accuracies of predictions against their captions
    (judge.prompt_accuracy's numbers; "relation" over the 2-object captions only)."""
    if len(caps) != len(preds):
        raise ValueError(f"{len(preds)} images but {len(caps)} captions")
    keys = ("prompt", "count", "objects", "shapes", "colours", "background")
    acc = {k: 0 for k in (*keys, "relation")}
    n_rel = 0
    for cap, p in zip(caps, preds):
        r = reads_as(cap, p)
        for k in keys:
            acc[k] += r[k]
        if parse_caption(cap)[2] is not None:
            n_rel += 1
            acc["relation"] += r["relation"]
    n = max(len(caps), 1)
    out = {("prompt_accuracy" if k == "prompt" else k): acc[k] / n for k in keys}
    out.update(relation=acc["relation"] / n_rel if n_rel else float("nan"), n=len(caps), n_relation=n_rel)
    return out


class OnnxJudge:
    """The judge through ONNX Runtime (no torch): judge.onnx takes (B, 3, 64, 64) float in [0, 1]
    and returns the raw heads by name."""

    def __init__(self, path: str | Path = ONNX_PATH):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def raw(self, images) -> dict[str, np.ndarray]:
        x = batch_64(images).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return dict(zip(self.names, self.session.run(None, {"image": x})))

    def predict(self, images) -> list[dict]:
        raw = self.raw(images)
        return [decode(raw, i) for i in range(len(raw["heat"]))]

    def prompt_accuracy(self, images, caps: list[str]) -> dict:
        return score(self.predict(images), caps)
