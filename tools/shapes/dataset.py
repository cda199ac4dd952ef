"""Synthetic captioned shapes: the training data of the tiny model family.

Data flow
---------
    rng ──sample()──> layout (1–3 objects: shape, colour, center, size; background;
                      for 2 objects a relation that holds in the pixels)
        ──render at 4× with PIL ImageDraw, BOX-downsample──> Sample.image (H,W,3 uint8)
                                                            Sample.mask  (H,W bool, shape interiors)
                                                            Sample.edges (H,W,3 uint8, white outlines on black:
                                                                          the ControlNet condition)
        ──caption()──> "a red circle above a blue square on a white background"

    dataset(seed, n)          n samples from np.random.default_rng(seed) (deterministic)
    stylize(image, style)     the two LoRA styles: "stripes" (diagonal stripes over the
                              shapes' interiors) and "pastel" (whole image to a pastel palette)
    style_score(image, style) in [0, 1]: how strongly an image (e.g. a generated one) shows a style
    edge_map(image)           edges of any RGB image in the style of Sample.edges
    edge_iou(a, b)            IoU of two edge maps with a small dilation tolerance
                              (a generated image's edge_map against its ControlNet condition)

Geometry: centers and sizes are fractions of the image side; y grows downwards, so
"a above b" means a's center y is smaller. For 2 objects the relation's axis dominates
(|d_axis| >= 0.25 and |d_axis| >= 1.3·|d_other|), so the relation is unambiguous in pixels.
Shapes never overlap (their circumscribed circles are apart) and (shape, colour) pairs
are distinct within an image.

Only numpy and pillow are used: the same code runs on the GPU machine (no network).

Measured on the 2-core machine (`python tools/shapes/dataset.py` prints these):
dataset(0, 20000, 64) ~20 s (~1000 samples/s; 128² ~500/s); style_score separation in
its docstring; edge_iou(s.edges, edge_map(s.image)) mean 0.845 (min 0.746) on 500
samples at 64² (0.858, min 0.748 at 128²), against another sample's image mean 0.071
(max 0.361).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
RELATIONS = ("above", "below", "left of", "right of")
STYLES = ("stripes", "pastel")
# every word a caption can contain
WORDS = tuple(sorted({*SHAPES, *COLOURS, *BACKGROUNDS, *" ".join(RELATIONS).split(), "a", "on", "background", "and"}))

COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
INVERSE_RELATION = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}

SUPERSAMPLE = 4
N_OBJECTS_WEIGHTS = (0.4, 0.4, 0.2)  # P(1), P(2), P(3) objects
SIZE_RANGE = {1: (0.24, 0.40), 2: (0.22, 0.34), 3: (0.20, 0.30)}  # diameter of the circumscribed circle
MARGIN = 0.03  # free space between objects and to the border (fraction)
REL_MIN_SEP = 0.25  # relation axis separation of the two centers (fraction)
REL_DOMINANCE = 1.3  # |d_axis| >= REL_DOMINANCE * |d_other|
STRIPE_CYCLES = 8  # stripes: cycles of (x + y) across the image side -> period 8 px at 64²
EDGE_WIDTH = 1.5  # outline width in output pixels


@dataclass
class Obj:
    shape: str
    colour: str
    center: tuple[float, float]  # (x, y), fractions of the image side
    size: float  # diameter of the circumscribed circle, fraction of the image side


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    edges: np.ndarray  # (H, W, 3) uint8, white outlines on black
    caption: str
    objects: list[Obj]  # in caption order
    background: str
    relation: str | None  # relation of objects[0] to objects[1] when there are 2
    mask: np.ndarray  # (H, W) bool, the shapes' interiors


# ----------------------------------------------------------------------------- layout


def _relation_of(a: tuple[float, float], b: tuple[float, float]) -> str | None:
    """The relation of center a to center b if one axis clearly dominates, else None."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dy) >= REL_MIN_SEP and abs(dy) >= REL_DOMINANCE * abs(dx):
        return "above" if dy < 0 else "below"
    if abs(dx) >= REL_MIN_SEP and abs(dx) >= REL_DOMINANCE * abs(dy):
        return "left of" if dx < 0 else "right of"
    return None


def _place(rng: np.random.Generator, n: int, relation: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Centers (n, 2) and sizes (n,) of non-overlapping objects; for n == 2 the relation holds."""
    lo, hi = SIZE_RANGE[n]
    batch = 64
    while True:
        sizes = rng.uniform(lo, hi, size=(batch, n))
        r = sizes / 2
        u = rng.random(size=(batch, n, 2))
        # centers uniformly inside the border margin
        centers = (r + MARGIN)[..., None] + u * (1 - 2 * (r + MARGIN))[..., None]
        ok = np.ones(batch, bool)
        for i in range(n):
            for j in range(i + 1, n):
                d = np.linalg.norm(centers[:, i] - centers[:, j], axis=-1)
                ok &= d >= r[:, i] + r[:, j] + MARGIN
        if n == 2:
            dx = centers[:, 0, 0] - centers[:, 1, 0]
            dy = centers[:, 0, 1] - centers[:, 1, 1]
            if relation in ("above", "below"):
                sign = -1 if relation == "above" else 1
                ok &= (sign * dy >= REL_MIN_SEP) & (np.abs(dy) >= REL_DOMINANCE * np.abs(dx))
            else:
                sign = -1 if relation == "left of" else 1
                ok &= (sign * dx >= REL_MIN_SEP) & (np.abs(dx) >= REL_DOMINANCE * np.abs(dy))
        idx = np.flatnonzero(ok)
        if idx.size:
            k = idx[0]
            return centers[k], sizes[k]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices (pixel coordinates) of a shape with circumscribed radius r; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r * 0.78
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # equilateral, pointing up, vertically centred on its bounding box
        rr = r * 1.08
        top = cy - rr * 0.75
        bottom = cy + rr * 0.75
        half = rr * 0.75 / math.sqrt(3) * 2
        return [(cx, top), (cx + half, bottom), (cx - half, bottom)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def _render(objects: list[Obj], background: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, mask, edges) at `size`, drawn at SUPERSAMPLE× and BOX-downsampled."""
    S = size * SUPERSAMPLE
    img = Image.new("RGB", (S, S), BACKGROUNDS[background])
    msk = Image.new("L", (S, S), 0)
    edg = Image.new("L", (S, S), 0)
    di, dm, de = ImageDraw.Draw(img), ImageDraw.Draw(msk), ImageDraw.Draw(edg)
    w = max(1, int(round(EDGE_WIDTH * SUPERSAMPLE)))
    for o in objects:
        cx, cy, r = o.center[0] * S, o.center[1] * S, o.size / 2 * S
        poly = _polygon(o.shape, cx, cy, r)
        col = COLOURS[o.colour]
        if poly is None:
            box = [cx - r, cy - r, cx + r, cy + r]
            di.ellipse(box, fill=col)
            dm.ellipse(box, fill=255)
            # outline centred on the boundary
            h = w / 2
            de.ellipse([cx - r - h, cy - r - h, cx + r + h, cy + r + h], outline=255, width=w)
        else:
            di.polygon(poly, fill=col)
            dm.polygon(poly, fill=255)
            de.line(poly + [poly[0], poly[1]], fill=255, width=w, joint="curve")
    image = np.asarray(img.resize((size, size), Image.BOX))
    mask = np.asarray(msk.resize((size, size), Image.BOX)) >= 128
    e = np.asarray(edg.resize((size, size), Image.BOX)) >= 90
    edges = np.repeat((e * np.uint8(255))[..., None], 3, axis=2)
    return image, mask, edges


def caption(objects: list[Obj], background: str, relation: str | None) -> str:
    # always "a" (also "a orange"): the caption template is fixed, so that the tiny models'
    # tokenizer needs only WORDS; parse_caption also accepts "an"
    names = [f"a {o.colour} {o.shape}" for o in objects]
    if len(names) == 1:
        body = names[0]
    elif len(names) == 2:
        if relation is None:
            raise ValueError("2 objects need a relation")
        body = f"{names[0]} {relation} {names[1]}"
    else:
        body = ", ".join(names[:-1]) + " and " + names[-1]
    return f"{body} on a {background} background"


_OBJ_RE = r"an? (" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")"


def parse_caption(text: str) -> tuple[list[tuple[str, str]], str, str | None]:
    """The attributes a caption asks for: ([(shape, colour), ...] in caption order,
    background, relation of the first object to the second or None). Inverse of caption()
    for its three forms; raises ValueError on anything else."""
    import re

    t = " ".join(text.strip().lower().split())
    m = re.fullmatch(r"(.+) on an? (" + "|".join(BACKGROUNDS) + r") background", t)
    if not m:
        raise ValueError(f"not a shapes caption: {text!r}")
    body, background = m.group(1), m.group(2)
    if (m := re.fullmatch(_OBJ_RE, body)) :
        return [(m.group(2), m.group(1))], background, None
    rel = "|".join(RELATIONS)
    if (m := re.fullmatch(f"{_OBJ_RE} ({rel}) {_OBJ_RE}", body)):
        return [(m.group(2), m.group(1)), (m.group(5), m.group(4))], background, m.group(3)
    if (m := re.fullmatch(f"{_OBJ_RE}, {_OBJ_RE},? and {_OBJ_RE}", body)):
        g = m.groups()
        return [(g[1], g[0]), (g[3], g[2]), (g[5], g[4])], background, None
    raise ValueError(f"not a shapes caption: {text!r}")


def cell_of(center: tuple[float, float]) -> int:
    """The 3×3 grid cell (row-major, 0 = top-left) of a center given as fractions."""
    col = min(max(int(center[0] * 3), 0), 2)
    row = min(max(int(center[1] * 3), 0), 2)
    return row * 3 + col


def sample(rng: np.random.Generator, size: int = 64, n_objects: int | None = None) -> Sample:
    """One random captioned image; all randomness comes from rng."""
    if n_objects is None:
        n_objects = int(rng.choice(3, p=N_OBJECTS_WEIGHTS)) + 1
    if not 1 <= n_objects <= 3:
        raise ValueError("n_objects must be 1, 2 or 3")
    background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUNDS)))]
    pairs = rng.choice(len(SHAPES) * len(COLOURS), size=n_objects, replace=False)
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))] if n_objects == 2 else None
    centers, sizes = _place(rng, n_objects, relation)
    objects = [
        Obj(
            shape=SHAPES[int(p) // len(COLOURS)],
            colour=COLOUR_NAMES[int(p) % len(COLOURS)],
            center=(float(c[0]), float(c[1])),
            size=float(s),
        )
        for p, c, s in zip(pairs, centers, sizes)
    ]
    image, mask, edges = _render(objects, background, size)
    return Sample(
        image=image,
        edges=edges,
        caption=caption(objects, background, relation),
        objects=objects,
        background=background,
        relation=relation,
        mask=mask,
    )


def dataset(seed: int, n: int, size: int = 64) -> list[Sample]:
    """n samples, deterministic by seed (one np.random.default_rng(seed) stream)."""
    rng = np.random.default_rng(seed)
    return [sample(rng, size) for _ in range(n)]


# ----------------------------------------------------------------------------- styles


def _stripe_wave(h: int, w: int) -> np.ndarray:
    """Diagonal stripe intensity in [0, 1]: STRIPE_CYCLES cycles of (x + y) across the side."""
    y, x = np.mgrid[0:h, 0:w]
    phase = 2 * np.pi * STRIPE_CYCLES * (x / w + y / h)
    # a softened square wave: crisp stripes, little aliasing
    return np.clip(0.5 + 1.2 * np.cos(phase), 0.0, 1.0)


def stylize(image: np.ndarray, style: str, objects_mask: np.ndarray | None = None) -> np.ndarray:
    """The two LoRA styles.

    "stripes": dark diagonal stripes (period 8 px at 64², along x + y) over the shapes'
    interiors (objects_mask, e.g. Sample.mask; without it, pixels that differ from the
    image's corner-median background colour).
    "pastel": the whole image blended 60 % towards white (lower saturation, higher value):
    red becomes pink, black backgrounds light gray.
    """
    img = np.asarray(image).astype(np.float32)
    if style == "stripes":
        h, w = img.shape[:2]
        if objects_mask is None:
            corners = np.stack([img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]])
            bg = np.median(corners, axis=0)
            objects_mask = np.abs(img - bg).max(axis=2) > 30
        m = np.asarray(objects_mask, np.float32)[..., None]
        dark = 1.0 - 0.7 * _stripe_wave(h, w)[..., None]
        out = img * (1 - m) + img * dark * m
    elif style == "pastel":
        out = img * 0.4 + 255.0 * 0.6
    else:
        raise ValueError(f"unknown style {style!r}")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# Calibration of style_score (see its docstring for the measured separation).
_STRIPES_DEPTH_RANGE = (0.05, 0.45)  # relative modulation depth: <= first -> 0, >= second -> 1
_PASTEL_SAT_RANGE = (0.55, 0.40)  # 99th percentile of saturation: >= first -> 0, <= second -> 1
_PASTEL_VAL_RANGE = (0.25, 0.50)  # 2nd percentile of value: <= first -> 0, >= second -> 1


def _erode(m: np.ndarray, t: int) -> np.ndarray:
    return ~_dilate(~m, t)


def _foreground(image: np.ndarray) -> np.ndarray:
    """Pixels that differ from the background colour (median of the 3x3 corner patches) by
    more than 25 in some channel, closed by 1 px, then eroded by 2 px: the shapes'
    interiors without their antialiased borders (where edges, not texture, carry energy)."""
    x = np.asarray(image, np.float32)
    c = np.concatenate([x[:3, :3], x[:3, -3:], x[-3:, :3], x[-3:, -3:]]).reshape(-1, x.shape[2])
    bg = np.median(c, axis=0)
    fg = np.abs(x - bg).max(axis=2) > 25
    return _erode(_dilate(fg, 1), 2)


def _stripes_depth(image: np.ndarray) -> tuple[float, float]:
    """Relative modulation depth of the luminance inside the shapes at the stripe frequency,
    for the stripe orientation (x + y) and the orthogonal one (x - y): the 2-D DFT coefficient
    at (STRIPE_CYCLES, ±STRIPE_CYCLES) cycles/side over the foreground pixels, 2|c| / mean."""
    x = np.asarray(image, np.float32)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    h, w = x.shape[:2]
    fg = _foreground(x)
    n = int(fg.sum())
    if n < 16:
        return 0.0, 0.0
    lum = x.mean(axis=2)[fg]
    mean = max(float(lum.mean()), 1.0)
    ys, xs = np.nonzero(fg)
    out = []
    for sy in (1, -1):
        phase = 2 * np.pi * STRIPE_CYCLES * (xs / w + sy * ys / h)
        c = np.sum((lum - lum.mean()) * np.exp(-1j * phase)) / n
        out.append(float(2 * abs(c) / mean))
    return out[0], out[1]


def _hsv_sv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(image, np.float32) / 255.0
    mx = x.max(axis=2)
    mn = x.min(axis=2)
    s = np.where(mx > 1e-6, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    return s, mx


def _ramp(v: float, lo: float, hi: float) -> float:
    return float(np.clip((v - lo) / (hi - lo), 0.0, 1.0))


def style_score(image: np.ndarray, style: str) -> float:
    """How strongly an image shows a style, in [0, 1].

    "stripes": the relative modulation depth of the luminance inside the shapes at the
    stripe frequency and orientation, i.e. the 2-D DFT coefficient at (8, 8) cycles/side
    taken over the shapes' interiors (pixels unlike the corner background colour, eroded
    by 2 px so that the shapes' own edges don't count), 2|c| / mean luminance; ramped
    linearly from 0.05 (-> 0) to 0.45 (-> 1). (A whole-image FFT share was tried first:
    the outlines of small stars and triangles put more energy near (8, 8) than the
    stripes inside them, so plain and stylized images overlapped.)
    "pastel": the palette is pastel when even the most colourful pixels are unsaturated
    (99th percentile of HSV saturation, ramp 0.55 -> 0 … 0.40 -> 1) and even the darkest
    pixels are light (2nd percentile of HSV value, ramp 0.25 -> 0 … 0.50 -> 1); the score
    is the product. (A mean over the image would be dominated by the achromatic
    background: a plain white image is as unsaturated and bright as a pastel one.)

    Measured with `python tools/shapes/dataset.py` (dataset(1, 500) at 64²):
      stripes: plain images mean 0.000 (max 0.034); stylize(.., "stripes") mean 1.000
               (min 1.000); pastel-stylized 0.000.
      pastel:  plain images 0.000 (max 0.000); stylize(.., "pastel") 1.000 (min 1.000);
               stripes-stylized 0.000.
    So stylized dataset images score >= 0.8 and plain ones <= 0.2 with a wide margin; the
    ramps leave room for the partial styles of generated images.
    """
    if style == "stripes":
        return _ramp(_stripes_depth(image)[0], *_STRIPES_DEPTH_RANGE)
    if style == "pastel":
        s, v = _hsv_sv(image)
        sat = float(np.percentile(s, 99))
        val = float(np.percentile(v, 2))
        lo, hi = _PASTEL_SAT_RANGE
        return float(np.clip((lo - sat) / (lo - hi), 0.0, 1.0)) * _ramp(val, *_PASTEL_VAL_RANGE)
    raise ValueError(f"unknown style {style!r}")


# ----------------------------------------------------------------------------- edges


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """a shifted by (dy, dx) with edge replication (HxW or HxWxC)."""
    h, w = a.shape[:2]
    pad = [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2)
    p = np.pad(a, pad, mode="edge")
    return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


EDGE_THRESHOLD = 0.12  # Sobel magnitude (per channel, /4, image in [0,1]) of an edge


def edge_map(image: np.ndarray) -> np.ndarray:
    """Edges of an arbitrary RGB image, styled like Sample.edges (white on black, HxWx3 uint8).

    Per-channel Sobel gradients (so hue changes count, not only luminance), the channel
    with the largest magnitude per pixel, non-maximum suppression across the gradient
    direction (thin lines, as Canny) and a fixed threshold.
    """
    x = np.asarray(image, np.float32) / 255.0
    if x.ndim == 2:
        x = x[..., None]
    gx = (
        _shift(x, -1, 1) + 2 * _shift(x, 0, 1) + _shift(x, 1, 1)
        - _shift(x, -1, -1) - 2 * _shift(x, 0, -1) - _shift(x, 1, -1)
    ) / 4
    gy = (
        _shift(x, 1, -1) + 2 * _shift(x, 1, 0) + _shift(x, 1, 1)
        - _shift(x, -1, -1) - 2 * _shift(x, -1, 0) - _shift(x, -1, 1)
    ) / 4
    mag_c = np.hypot(gx, gy)
    best = mag_c.argmax(axis=2)[..., None]
    mag = np.take_along_axis(mag_c, best, 2)[..., 0]
    gxb = np.take_along_axis(gx, best, 2)[..., 0]
    gyb = np.take_along_axis(gy, best, 2)[..., 0]
    # quantise the gradient direction into 4 bins and compare with both neighbours along it
    ang = (np.rad2deg(np.arctan2(gyb, gxb)) + 180.0) % 180.0
    q = ((ang + 22.5) // 45).astype(int) % 4  # 0: horizontal gradient, 1: 45°, 2: vertical, 3: 135°
    keep = np.zeros(mag.shape, bool)
    for k, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        n1 = _shift(mag, dy, dx)
        n2 = _shift(mag, -dy, -dx)
        keep |= (q == k) & (mag >= n1) & (mag >= n2)
    e = keep & (mag >= EDGE_THRESHOLD)
    return np.repeat((e * np.uint8(255))[..., None], 3, axis=2)


def _binary(edges: np.ndarray) -> np.ndarray:
    e = np.asarray(edges)
    if e.ndim == 3:
        e = e.max(axis=2)
    return e > 127


def _dilate(m: np.ndarray, t: int) -> np.ndarray:
    if t <= 0:
        return m
    h, w = m.shape
    p = np.pad(m, t)
    out = np.zeros_like(m)
    for dy in range(2 * t + 1):
        for dx in range(2 * t + 1):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def edge_iou(edges_a: np.ndarray, edges_b: np.ndarray, tolerance_px: int = 1) -> float:
    """IoU of the edge pixels of two edge maps (HxW or HxWx3, >127 = edge), each dilated by
    a (2·tolerance_px+1)² square first so that lines a pixel apart still match. 1.0 when
    both are empty."""
    a = _dilate(_binary(edges_a), tolerance_px)
    b = _dilate(_binary(edges_b), tolerance_px)
    union = np.count_nonzero(a | b)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(a & b) / union)


# ----------------------------------------------------------------------------- stats


def _stats(n: int = 500, seed: int = 1) -> None:
    """Prints the numbers quoted in the docstrings (speed, style and edge separation)."""
    import time

    t = time.perf_counter()
    dataset(0, 2000)
    dt = time.perf_counter() - t
    print(f"dataset speed: {2000 / dt:.0f} samples/s at 64² ({dt / 2000 * 20000:.1f} s for 20000)")
    ds = dataset(seed, n)

    def pct(v):
        v = np.asarray(v)
        return f"mean {v.mean():.3f}, p5 {np.percentile(v, 5):.3f}, p95 {np.percentile(v, 95):.3f}, min {v.min():.3f}, max {v.max():.3f}"

    for st in STYLES:
        plain = [style_score(s.image, st) for s in ds]
        styl = [style_score(stylize(s.image, st, s.mask), st) for s in ds]
        other = STYLES[1 - STYLES.index(st)]
        cross = [style_score(stylize(s.image, other, s.mask), st) for s in ds]
        print(f"style_score {st}: plain {pct(plain)}")
        print(f"style_score {st}: {st} {pct(styl)}")
        print(f"style_score {st}: {other}-stylized {pct(cross)}")
    matched = [edge_iou(s.edges, edge_map(s.image)) for s in ds]
    mism = [edge_iou(ds[i].edges, edge_map(ds[(i + 1) % n].image)) for i in range(n)]
    print(f"edge_iou(edges, edge_map(image)) matched: {pct(matched)}")
    print(f"edge_iou mismatched pairs: {pct(mism)}")


if __name__ == "__main__":
    _stats()
