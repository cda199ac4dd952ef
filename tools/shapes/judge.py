"""The judge: a small CNN that reads a 64×64 shapes image back into attributes, so that
generated images can be scored against their prompts.

Data flow
---------
    train:   dataset.sample(rng) fresh every step (seeded; 30 % stylized with a LoRA style,
             some blurred / noised / colour-jittered so that generated images read like data)
             -> JudgeNet, a fully convolutional detector on an 8×8 grid of 8-px cells: per
                cell objectness (an object's center lies here), shape (4), colour (6) and the
                center's offset in the cell; background (3) from pooled features
             -> judge.pt (fp16 weights + the held-out accuracies; ~0.3 MB)
    predict: image -> JudgeNet -> objects = objectness peaks (3×3 local maxima > 0.5, at
             most 3), each with shape, colour, center and its 3×3 grid cell
             -> slots: 3 of (shape | "none", colour | "none", cell | None), sorted
                canonically (3×3 row top-to-bottom, then x left-to-right)
             -> relation of slot 0 to slot 1 when there are 2 objects, from the centers
             -> background
    prompt_accuracy(images, samples or captions)
             -> parse_caption -> asked (shape, colour) set, background, relation
             -> per image: all match? plus per-attribute accuracies

Why a detector rather than 3 ordered classification slots: slots ordered by position are
ill-defined when two centers are nearly level (a tiny move swaps the slots and their
labels), and a global head has to learn the ordering on top of the reading. Per-cell
outputs give every object its own well-defined target and train in minutes on a CPU;
the 3 slots (shape 5-way incl. "none", colour 7-way incl. "none", cell 9-way) and their
canonical order are derived from the detections. A caption's relation is checked from
the centers of the objects the caption names (whatever slot they landed in), so the
caption's order survives the canonical slot order. Relations use the dominant axis of the
two centers (the dataset only draws relations whose axis dominates by 1.3×).

CLI:
    python tools/shapes/judge.py train --out tools/shapes/judge.pt --device cpu --minutes 10
    python tools/shapes/judge.py eval  --judge tools/shapes/judge.pt [--n 1000]
    python tools/shapes/judge.py export-onnx      # judge.onnx: shapes.reading.OnnxJudge, no torch

Measured (the committed judge.pt, 143,696 parameters, 0.30 MB in fp16): trained with
`train --minutes 10 --device cpu` on the 2-core machine while other builds/tests shared it,
2336 steps × 64 fresh samples in 600 s (1 torch thread + 1 data worker process; the
shape/colour losses were < 0.02 after ~800 steps, ~4 minutes). Held-out dataset(10_001,
1000): prompt accuracy 0.996 plain and 0.996 stylized (count, object set, shapes,
colours 0.996; background 1.000; relation 1.000; 3×3 cell 0.988; center error 0.003 of
the side; slot shape / colour 0.994). `eval` on dataset(424242, 1000): 0.999 plain, 0.998
stylized, 0.003 with shuffled captions. Robust on dataset(777, 500) to a Gaussian blur of
radius 1.5 (0.992), noise σ=20 (0.996), a 32² round trip (0.998), 128² renders (0.998).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make `shapes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shapes.dataset import (  # noqa: E402
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    RELATIONS,
    SHAPES,
    STYLES,
    Sample,
    cell_of,
    dataset,
    parse_caption,
    sample,
    stylize,
)

from shapes.reading import GRID, IMAGE_SIZE, PEAK_THRESHOLD, as_64 as _as_64, decode as _decode, match as _match  # noqa: E402,F401
from shapes.reading import relation_of, score as _score  # noqa: E402

DEFAULT_PATH = Path(__file__).resolve().parent / "judge.pt"
SLOT_SHAPES = SHAPES + ("none",)  # 5 classes
SLOT_COLOURS = COLOUR_NAMES + ("none",)  # 7 classes

__all__ = [
    "JudgeNet",
    "load_judge",
    "predict",
    "prompt_accuracy",
    "parse_caption",
    "relation_of",
    "train",
]


# ----------------------------------------------------------------------------- model


def _block(i: int, o: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, k, stride, (k - 1) // 2 if k == 3 else 0, bias=False),
                         nn.BatchNorm2d(o), nn.ReLU(inplace=True))


class JudgeNet(nn.Module):
    """A fully convolutional detector (CenterNet-like): 64×64 RGB -> 8×8 cells, each with
    objectness (is an object's center in this cell), shape (4), colour (6) and the center's
    offset inside the cell (2); plus the background (3) from globally pooled features."""

    def __init__(self, widths: tuple[int, int, int] = (32, 48, 64), hidden: int = 64):
        super().__init__()
        a, c, d = widths
        self.widths, self.hidden = tuple(widths), hidden
        self.features = nn.Sequential(
            _block(3, a, 4, k=4),  # 16², a patchify stem (3× cheaper than 3×3 convs at 32² on CPU)
            _block(a, c), _block(c, c),  # 16²
            _block(c, d, 2), _block(d, d), _block(d, d),  # 8², receptive field ~68 px
        )
        # the head also sees each cell's mean and max colour (a shortcut for the colour)
        self.cells = nn.Sequential(nn.Conv2d(d + 6, hidden, 1), nn.ReLU(inplace=True),
                                   nn.Conv2d(hidden, 1 + len(SHAPES) + len(COLOUR_NAMES) + 2, 1))
        self.bg = nn.Linear(d, len(BACKGROUND_NAMES))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, 64, 64) float in [0, 1]."""
        x = x * 2 - 1
        f = self.features(x)
        cell = max(1, x.shape[-1] // GRID)
        y = self.cells(torch.cat([f, F.avg_pool2d(x, cell), F.max_pool2d(x, cell)], 1))
        ns, nc = len(SHAPES), len(COLOUR_NAMES)
        return {
            "heat": y[:, 0],  # (B, 8, 8) logits
            "shape": y[:, 1 : 1 + ns],  # (B, 4, 8, 8) logits
            "colour": y[:, 1 + ns : 1 + ns + nc],  # (B, 6, 8, 8) logits
            "offset": torch.sigmoid(y[:, 1 + ns + nc :]),  # (B, 2, 8, 8): (x, y) inside the cell
            "background": self.bg(f.mean((2, 3))),  # (B, 3) logits
        }


def _to_tensor(images: list[np.ndarray] | np.ndarray, device: torch.device | str) -> torch.Tensor:
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype == np.uint8 and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3):
        arr = images
    else:
        arr = np.stack([_as_64(np.asarray(im)) for im in images])
    t = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255).contiguous()


# ----------------------------------------------------------------------------- targets


HEAT_SIGMA = 0.75  # cells: soft objectness target around each center cell


def _targets(samples: list[Sample]) -> dict[str, np.ndarray]:
    B = len(samples)
    heat = np.zeros((B, GRID, GRID), np.float32)
    pos = np.zeros((B, GRID, GRID), np.float32)
    shape = np.zeros((B, GRID, GRID), np.int64)
    colour = np.zeros((B, GRID, GRID), np.int64)
    offset = np.zeros((B, 2, GRID, GRID), np.float32)
    background = np.zeros(B, np.int64)
    gy, gx = np.mgrid[0:GRID, 0:GRID] + 0.5
    for i, s in enumerate(samples):
        for o in s.objects:
            cx, cy = o.center[0] * GRID, o.center[1] * GRID
            col, row = min(int(cx), GRID - 1), min(int(cy), GRID - 1)
            heat[i] = np.maximum(heat[i], np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * HEAT_SIGMA**2)))
            heat[i, row, col] = 1.0
            pos[i, row, col] = 1.0
            shape[i, row, col] = SHAPES.index(o.shape)
            colour[i, row, col] = COLOUR_NAMES.index(o.colour)
            offset[i, :, row, col] = (cx - col, cy - row)
        background[i] = BACKGROUND_NAMES.index(s.background)
    return {"heat": heat, "pos": pos, "shape": shape, "colour": colour, "offset": offset, "background": background}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur / noise / colour gain on a batch in [0, 1], so the judge reads imperfect images."""
    B = x.shape[0]
    dev = x.device

    def coin(p):
        return (torch.rand(B, 1, 1, 1, generator=g, device=dev) < p).float()

    # gaussian blur, sigma in [0.4, 1.0], on 25 %
    sigma = 0.4 + 0.6 * torch.rand(B, generator=g, device=dev)
    k = torch.arange(-2, 3, device=dev, dtype=x.dtype)
    w = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None] ** 2))
    w = w / w.sum(1, keepdim=True)  # (B, 5)
    xb = x.reshape(1, B * 3, 64, 64)
    kx = w.repeat_interleave(3, 0).view(B * 3, 1, 1, 5)
    ky = w.repeat_interleave(3, 0).view(B * 3, 1, 5, 1)
    xb = F.conv2d(F.pad(xb, (2, 2, 0, 0), mode="replicate"), kx, groups=B * 3)
    xb = F.conv2d(F.pad(xb, (0, 0, 2, 2), mode="replicate"), ky, groups=B * 3)
    c = coin(0.25)
    x = c * xb.view(B, 3, 64, 64) + (1 - c) * x
    # per-channel gain +-6 % and offset +-3 % on 40 %
    c = coin(0.4)
    gain = 1 + 0.12 * (torch.rand(B, 3, 1, 1, generator=g, device=dev) - 0.5)
    off = 0.06 * (torch.rand(B, 3, 1, 1, generator=g, device=dev) - 0.5)
    x = c * (x * gain + off) + (1 - c) * x
    # gaussian noise, std up to 6/255, on 30 %
    c = coin(0.3)
    std = 6 / 255 * torch.rand(B, 1, 1, 1, generator=g, device=dev)
    x = x + c * std * torch.randn(x.shape, generator=g, device=dev)
    return x.clamp(0, 1).contiguous()


def _batch(rng: np.random.Generator, n: int, p_style: float = 0.3) -> tuple[np.ndarray, list[Sample]]:
    samples = [sample(rng, IMAGE_SIZE) for _ in range(n)]
    images = []
    for s in samples:
        im = s.image
        if rng.random() < p_style:
            im = stylize(im, STYLES[int(rng.integers(len(STYLES)))], s.mask)
        images.append(im)
    return np.stack(images), samples


def _loss(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    B = out["heat"].shape[0]
    lh = F.binary_cross_entropy_with_logits(out["heat"], t["heat"], reduction="sum") / B
    m = t["pos"]
    npos = m.sum().clamp(min=1)
    ls = (F.cross_entropy(out["shape"], t["shape"], reduction="none") * m).sum() / npos
    lc = (F.cross_entropy(out["colour"], t["colour"], reduction="none") * m).sum() / npos
    lo = (F.l1_loss(out["offset"], t["offset"], reduction="none").sum(1) * m).sum() / npos
    lb = F.cross_entropy(out["background"], t["background"])
    total = lh + ls + lc + lo + lb
    return total, {"heat": lh.item(), "shape": ls.item(), "colour": lc.item(), "offset": lo.item(), "background": lb.item()}


# ----------------------------------------------------------------------------- prediction


@torch.no_grad()
def _raw(judge: JudgeNet, images, batch_size: int = 256) -> dict[str, np.ndarray]:
    dev = next(judge.parameters()).device
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(images), batch_size):
        o = judge(_to_tensor(images[i : i + batch_size], dev))
        for k, v in o.items():
            outs.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def predict(images, judge: JudgeNet | None = None) -> list[dict]:
    """Per image: {"objects": [{shape, colour, center, cell, p}], "slots": 3 slots (shape
    incl. "none", colour incl. "none", cell), "background", "relation" (slot 0 to slot 1
    when there are 2 objects)}; objects and slots sorted canonically (3×3 row, then x)."""
    judge = judge or load_judge()
    raw = _raw(judge, images)
    return [_decode(raw, i) for i in range(len(images))]


def prompt_accuracy(images, samples_or_captions, judge: JudgeNet | None = None) -> dict:
    """How many images show what their captions (or Samples) ask for.

    An image counts when its predicted objects, as a set of (shape, colour), equal the
    caption's, its background matches and, for 2 objects, the relation of the caption's
    first object to its second (read from the predicted centers) matches. Also returned:
    per-attribute accuracies — "count", "objects" (the set), "shapes" / "colours" (as
    multisets), "background", "relation" (over 2-object captions: relation of the
    predicted objects best matching the named ones) — and "n"."""
    judge = judge or load_judge()
    caps = [s.caption if isinstance(s, Sample) else str(s) for s in samples_or_captions]
    if len(caps) != len(images):
        raise ValueError(f"{len(images)} images but {len(caps)} captions")
    return _score(predict(images, judge), caps)


def heldout_accuracy(judge: JudgeNet, samples: list[Sample], images=None) -> dict:
    """Per-attribute accuracies against the samples' true layouts: count, object set,
    background, 3×3 cell of each object (of correctly found pairs), relation (of the
    true pair order, 2-object images), center error, and per-slot shape / colour (5- and
    7-way, slots in the canonical order), and the prompt accuracy."""
    images = [s.image for s in samples] if images is None else images
    preds = predict(images, judge)
    res = prompt_accuracy(images, samples, judge)
    cell_ok = cell_n = 0
    err = []
    slot_shape = slot_colour = 0
    for s, p in zip(samples, preds):
        found = {(o["shape"], o["colour"]): o for o in p["objects"]}
        for o in s.objects:
            q = found.get((o.shape, o.colour))
            if q is not None:
                cell_n += 1
                cell_ok += q["cell"] == cell_of(o.center)
                err.append(math.hypot(q["center"][0] - o.center[0], q["center"][1] - o.center[1]))
        truth = sorted(s.objects, key=lambda o: (cell_of(o.center) // 3, o.center[0], o.center[1]))
        tslots = [(o.shape, o.colour) for o in truth] + [("none", "none")] * (3 - len(truth))
        for (ts, tc), ps in zip(tslots, p["slots"]):
            slot_shape += ts == ps["shape"]
            slot_colour += tc == ps["colour"]
    n = len(samples)
    res.update({
        "cell": cell_ok / max(cell_n, 1),
        "center_error": float(np.mean(err)) if err else float("nan"),
        "slot_shape": slot_shape / (3 * n),
        "slot_colour": slot_colour / (3 * n),
    })
    return res


# ----------------------------------------------------------------------------- persistence


_CACHE: dict[tuple[str, str], JudgeNet] = {}


def load_judge(path: str | Path = DEFAULT_PATH, device: str | torch.device = "cpu") -> JudgeNet:
    key = (str(Path(path).resolve()), str(device))
    if key not in _CACHE:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        net = JudgeNet(tuple(ck["widths"]), int(ck["hidden"]))
        net.load_state_dict({k: v.float() for k, v in ck["state_dict"].items()})
        net.eval().to(device)
        _CACHE[key] = net
    return _CACHE[key]


def _save(net: JudgeNet, path: Path, meta: dict) -> None:
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    torch.save({"widths": list(net.widths), "hidden": net.hidden, "state_dict": sd, "meta": meta}, path)


# ----------------------------------------------------------------------------- training


def _producer(seed: int, batch_size: int, q) -> None:
    """Data worker: seeded batches of (images, targets) into q, forever."""
    rng = np.random.default_rng(seed)
    while True:
        images, samples = _batch(rng, batch_size)
        q.put((images, _targets(samples)))


class _Batches:
    """Training batches from `workers` processes (round-robin, each with its own seed, so
    the stream is deterministic), or made inline when workers == 0."""

    def __init__(self, seed: int, batch_size: int, workers: int):
        self.seed, self.batch_size, self.workers = seed, batch_size, workers
        self.step = 0
        if workers:
            import multiprocessing as mp

            ctx = mp.get_context("fork")
            self.queues = [ctx.Queue(maxsize=4) for _ in range(workers)]
            self.procs = [ctx.Process(target=_producer, args=(seed * 100 + w, batch_size, q), daemon=True)
                          for w, q in enumerate(self.queues)]
            for p in self.procs:
                p.start()
        else:
            self.rng = np.random.default_rng(seed * 100)

    def next(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        self.step += 1
        if self.workers:
            return self.queues[(self.step - 1) % self.workers].get()
        images, samples = _batch(self.rng, self.batch_size)
        return images, _targets(samples)

    def close(self) -> None:
        for p in getattr(self, "procs", []):
            p.terminate()
            p.join()


def train(out: Path, device: str = "cpu", minutes: float = 8.0, steps: int | None = None,
          batch_size: int = 64, lr: float = 4e-3, seed: int = 0, threads: int | None = None,
          workers: int = 1, heldout: int = 1000, log=print) -> dict:
    """Trains on fresh seeded samples until `minutes` of wall time (or `steps`) are used,
    with a cosine learning-rate schedule over that budget; evaluates on held-out data
    (dataset(10_001, 1000) plain and stylized), saves to `out` and returns the accuracies.

    On a CPU, torch gets 1 thread by default and a data worker process renders samples on
    the other core: on the 2-core machine 2 torch threads were ~3× slower per step than 1
    when other work shared the cores."""
    torch.set_num_threads(threads or (1 if device == "cpu" else max(1, torch.get_num_threads())))
    # data workers fork before anything touches CUDA
    batches = _Batches(1000 + seed, batch_size, workers)
    torch.manual_seed(seed)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    net = JudgeNet().to(device)
    log(f"JudgeNet: {sum(p.numel() for p in net.parameters())} parameters; "
        f"{torch.get_num_threads()} torch threads, {workers} data workers")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    budget = minutes * 60.0
    t0 = time.perf_counter()
    step = 0
    warm = 20
    try:
        while True:
            elapsed = time.perf_counter() - t0
            frac = step / steps if steps else elapsed / budget
            if frac >= 1:
                break
            scale = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * frac))
            for grp in opt.param_groups:
                grp["lr"] = lr * max(scale, 0.02)
            images, targets = batches.next()
            x = _augment(_to_tensor(images, device), g)
            t = {k: torch.from_numpy(v).to(device) for k, v in targets.items()}
            net.train()
            o = net(x)
            loss, parts = _loss(o, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                log(f"step {step} {elapsed:.0f}s loss {loss.item():.3f} " + " ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    finally:
        batches.close()
    train_s = time.perf_counter() - t0
    net.eval()
    held = dataset(10_001, heldout)
    plain = heldout_accuracy(net, held)
    srng = np.random.default_rng(10_002)
    styl_images = [stylize(s.image, STYLES[int(srng.integers(2))], s.mask) for s in held]
    styled = heldout_accuracy(net, held, styl_images)
    meta = {"train_seconds": round(train_s, 1), "steps": step, "batch_size": batch_size, "lr": lr,
            "seed": seed, "device": device, "heldout_plain": plain, "heldout_stylized": styled}
    _save(net, out, meta)
    log(f"trained {step} steps × {batch_size} in {train_s:.0f}s on {device}; saved {out} "
        f"({out.stat().st_size / 1e6:.2f} MB)")
    for name, r in (("held-out plain", plain), ("held-out stylized", styled)):
        log(name + ": " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return meta


def export_onnx(path: Path, out: Path) -> None:
    """The judge as an ONNX graph (input "image": (B, 3, 64, 64) float in [0, 1]; outputs the raw
    heads by name), checked against torch on fresh dataset images by relative error."""
    net = load_judge(path)
    names = ["heat", "shape", "colour", "offset", "background"]

    class Flat(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            o = self.m(x)
            return tuple(o[k] for k in names)

    imgs = np.stack([s.image for s in dataset(4242, 16)])
    want = _raw(net, imgs)  # (before the export, whose tracing runs may touch BatchNorm's statistics)
    x = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.onnx.export(Flat(net), (x,), str(out), input_names=["image"], output_names=names,
                      dynamic_axes={"image": {0: "batch"}, **{k: {0: "batch"} for k in names}},
                      opset_version=17, dynamo=False)
    from shapes.reading import OnnxJudge

    _CACHE.clear()
    got = OnnxJudge(out).raw(imgs)
    err = max(float(np.abs(got[k] - want[k]).max() / (np.abs(want[k]).max() + 1e-12)) for k in names)
    def reading(raw, i):
        d = _decode(raw, i)
        return [(o["shape"], o["colour"], o["cell"]) for o in d["objects"]], d["background"], d["relation"]

    same = [reading(want, i) == reading(got, i) for i in range(len(imgs))]
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): worst relative error vs torch {err:.1e} "
          f"on 16 fresh images, same reading on {sum(same)}/16")
    if err > 1e-4 or not all(same):
        raise SystemExit("the ONNX judge does not match the torch judge")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", type=Path, default=DEFAULT_PATH)
    t.add_argument("--device", default="cpu")
    t.add_argument("--minutes", type=float, default=8.0)
    t.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead of a time budget")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=4e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on cpu)")
    t.add_argument("--workers", type=int, default=1, help="data worker processes (0: inline)")
    e = sub.add_parser("eval")
    e.add_argument("--judge", type=Path, default=DEFAULT_PATH)
    e.add_argument("--device", default="cpu")
    e.add_argument("--n", type=int, default=1000)
    e.add_argument("--seed", type=int, default=424242)
    x = sub.add_parser("export-onnx", help="judge.pt -> judge.onnx (for shapes.reading.OnnxJudge: no torch needed)")
    x.add_argument("--judge", type=Path, default=DEFAULT_PATH)
    x.add_argument("--out", type=Path, default=DEFAULT_PATH.with_suffix(".onnx"))
    a = ap.parse_args(argv)
    if a.cmd == "export-onnx":
        export_onnx(a.judge, a.out)
        return
    if a.cmd == "train":
        train(a.out, a.device, a.minutes, a.steps, a.batch_size, a.lr, a.seed, a.threads, a.workers)
    else:
        net = load_judge(a.judge, a.device)
        ck = torch.load(a.judge, map_location="cpu", weights_only=True)
        print("trained:", {k: v for k, v in ck["meta"].items() if not k.startswith("heldout")})
        held = dataset(a.seed, a.n)
        print("plain:", heldout_accuracy(net, held))
        rng = np.random.default_rng(a.seed + 1)
        print("stylized:", heldout_accuracy(net, held, [stylize(s.image, STYLES[int(rng.integers(2))], s.mask) for s in held]))
        caps = [s.caption for s in held]
        shuffled = [caps[i] for i in rng.permutation(len(caps))]
        print("shuffled captions:", prompt_accuracy([s.image for s in held], shuffled, net))


if __name__ == "__main__":
    main()
