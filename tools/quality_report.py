#!/usr/bin/env python3
"""The quality report of the trained tiny family: what katz's approximations cost in pictures a judge can read.

Every image is made by the real `katz` binary (`katz generate`, or a real worker and
`katz controlnet-worker` through RabbitMQ and Redis for the service variant) from captions and
edge maps of the synthetic shapes dataset (tools/shapes), and scored:

    prompt accuracy   tools/shapes/judge.py (the stand-in for CLIP score: shapes, colours,
                      background, relation read back from the picture)
    ControlNet IoU    edge map of the picture vs the conditioning edges (dataset.edge_iou, 1 px)
    style score       dataset.style_score(image, style) for each LoRA's style
    SSIM / rel. diff  against the exact variant of the same job (quality.rs's SSIM, in numpy)

    variants                                  exact reference
    base, ControlNet (scale 1)                —
    LoRA <style>: sync                        —
    LoRA <style>: async, K = 0, 5, 10, 20     sync            (K of --steps, 50 by default)
    --gpu cuda:0        fp32 bundle on a GPU  the CPU image
    --fp16-bundle DIR   fp16 GPU bundle       the fp32 GPU image (needs --gpu)
    --split cuda:1      split guidance        the one-GPU image (needs --gpu)
    --fp8               fp8 GEMMs (--precision fp8; the fp16 bundle exported with --fp8)
                        base, ControlNet, LoRA  the fp16 GPU image of the same job (needs --fp16-bundle)
    --service           ControlNet service    the in-process ControlNet image

    python3 tools/quality_report.py --bundle B --controlnet CN --lora-dir DIR --out docs/quality/RUN
        [--n 24] [--steps 50] [--gpu cuda:0 [--fp16-bundle DIR] [--split cuda:1]] [--service]

Writes OUT/report.md (tables), OUT/report.json, OUT/grid.png (one row per variant, the first 8
captions) and the images under OUT/images/. The LoRA files are DIR/<style>.safetensors
(tools/train_tiny.py writes them so). Needs torch (the judge), numpy and pillow: the exporter's
venv has them (`tools/export.sh` makes it; run this with .venv-tools/bin/python).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
from shapes import dataset as shapes  # noqa: E402


# ───────────────────────────── metrics ─────────────────────────────


def _gauss(sigma: float = 1.5, n: int = 11) -> np.ndarray:
    x = np.arange(n) - n // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Valid separable convolution of an HxW array."""
    n = len(g)
    rows = np.stack([np.convolve(r, g, mode="valid") for r in a])
    return np.stack([np.convolve(c, g, mode="valid") for c in rows.T]).T if n else rows


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two HxWx3 uint8 images as onnx/src/quality.rs computes it (11×11 Gaussian
    window, σ 1.5, K1 0.01, K2 0.03, range 1, no padding, averaged over channels)."""
    x, y = a.astype(np.float64) / 255.0, b.astype(np.float64) / 255.0
    g = _gauss(1.5, min(11, (min(x.shape[:2]) // 2) * 2 - 1 if min(x.shape[:2]) < 11 else 11))
    c1, c2 = 0.01**2, 0.03**2
    out = []
    for ch in range(x.shape[2]):
        p, q = x[..., ch], y[..., ch]
        mp, mq = _filter(p, g), _filter(q, g)
        spp = _filter(p * p, g) - mp * mp
        sqq = _filter(q * q, g) - mq * mq
        spq = _filter(p * q, g) - mp * mq
        s = ((2 * mp * mq + c1) * (2 * spq + c2)) / ((mp * mp + mq * mq + c1) * (spp + sqq + c2))
        out.append(s.mean())
    return float(np.mean(out))


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12))


# ───────────────────────────── running katz ─────────────────────────────


class Katz:
    def __init__(self, exe: Path, env: dict):
        self.exe, self.env = str(exe), env
        self.calls, self.seconds = 0, 0.0
        import threading

        self.lock = threading.Lock()

    def run(self, *args: str) -> None:
        t0 = time.perf_counter()
        r = subprocess.run([self.exe, *args], env=self.env, capture_output=True, text=True)
        with self.lock:
            self.calls += 1
            self.seconds += time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"katz {' '.join(args[:1])} failed ({r.returncode}):\n{r.stderr[-2000:]}")


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="base bundle (the trained tiny family)")
    ap.add_argument("--controlnet", type=Path, required=True, help="its ControlNet bundle (edge maps)")
    ap.add_argument("--lora-dir", type=Path, required=True, help="DIR/<style>.safetensors per style")
    ap.add_argument("--styles", nargs="+", default=list(shapes.STYLES))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=24, help="captions (dataset seed 777, like train_tiny's judge run)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--bounds", default="0,5,10,20", help="async LoRA bounds K (steps)")
    ap.add_argument("--gpu", help="also on this GPU (fp32 bundle), against the CPU images")
    ap.add_argument("--fp16-bundle", type=Path, help="the same checkpoint exported with --gpu (fp16; needs --gpu)")
    ap.add_argument("--fp16-controlnet", type=Path, help="its ControlNet bundle (default: FP16_BUNDLE-controlnet)")
    ap.add_argument("--split", help="split guidance onto this second GPU (needs --gpu)")
    ap.add_argument("--fp8", action="store_true",
                    help="also --precision fp8 on the fp16 bundle (exported with --fp8), against its fp16 images")
    ap.add_argument("--service", action="store_true", help="ControlNet through a real worker + controlnet-worker")
    ap.add_argument("--katz", type=Path, default=REPO / "target" / "release" / "katz")
    ap.add_argument("--judge", type=Path, help="judge weights (default tools/shapes/judge.pt)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="katz processes at once (each image is its own `katz generate`; GPU hosts have the cores)")
    a = ap.parse_args(argv)
    if (a.fp16_bundle or a.split) and not a.gpu:
        ap.error("--fp16-bundle and --split need --gpu")
    if a.fp8 and not a.fp16_bundle:
        ap.error("--fp8 needs --fp16-bundle (a bundle exported with --gpu --fp8)")

    env = dict(os.environ)
    ort = REPO / ".katz" / "ort" / "libonnxruntime.so.1.31.1"
    if "ORT_DYLIB_PATH" not in env and ort.exists():
        env["ORT_DYLIB_PATH"] = str(ort)
    env.setdefault("KATZ_LOG", "warn")
    katz = Katz(a.katz, env)
    img_dir = a.out / "images"
    (img_dir / "cond").mkdir(parents=True, exist_ok=True)
    samples = shapes.dataset(777, a.n, a.size)
    conds = []
    for i, s in enumerate(samples):
        p = img_dir / "cond" / f"{i:03d}.png"
        Image.fromarray(s.edges).save(p)
        conds.append(p)
    size = f"{a.size}x{a.size}"
    common = ["--steps", str(a.steps), "--guidance", str(a.guidance), "--size", size]

    made: dict[str, list[Path]] = {}

    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max(1, a.jobs))

    def variant(name: str, extra_for, bundle: Path | None = None, device: str = "cpu"):
        (img_dir / name).mkdir(parents=True, exist_ok=True)
        paths = [img_dir / name / f"{i:03d}.png" for i in range(len(samples))]
        threads = (["--threads", str(max(1, (os.cpu_count() or 2) // a.jobs))] if a.jobs > 1 else [])
        runs = [pool.submit(katz.run, "generate", "--bundle", str(bundle or a.bundle), "--prompt", s.caption,
                            "--seed", str(i), "--device", device, "--output", str(p), *threads, *common, *extra_for(i))
                for i, (s, p) in enumerate(zip(samples, paths))]
        for r in runs:
            r.result()
        made[name] = paths
        print(f"  {name}: {len(paths)} images", flush=True)

    cn = lambda bundle: (lambda i: ["--controlnet", f"{bundle}={conds[i]}:1.0"])  # noqa: E731
    lora = lambda st, mode, k=None: (lambda i: ["--lora", f"{a.lora_dir / (st + '.safetensors')}:1.0",  # noqa: E731
                                                 "--lora-mode", mode, *(["--lora-bound", str(k)] if k is not None else [])])
    t0 = time.perf_counter()
    print(f"quality report: {a.n} captions, {a.size}², {a.steps} Euler steps, guidance {a.guidance} → {a.out}")
    variant("base", lambda i: [])
    variant("controlnet", cn(a.controlnet))
    bounds = [int(k) for k in a.bounds.split(",") if k]
    for st in a.styles:
        variant(f"lora-{st}-sync", lora(st, "sync"))
        for k in bounds:
            variant(f"lora-{st}-async-K{k}", lora(st, "async", k))
    if a.gpu:
        variant("gpu-fp32", lambda i: [], device=a.gpu)
        variant("gpu-fp32-controlnet", cn(a.controlnet), device=a.gpu)
        if a.fp16_bundle:
            fcn = a.fp16_controlnet or a.fp16_bundle.parent / (a.fp16_bundle.name + "-controlnet")
            variant("gpu-fp16", lambda i: [], bundle=a.fp16_bundle, device=a.gpu)
            variant("gpu-fp16-controlnet", cn(fcn), bundle=a.fp16_bundle, device=a.gpu)
            if a.fp8:
                fp8 = lambda extra: (lambda i: ["--precision", "fp8", *extra(i)])  # noqa: E731
                variant("gpu-fp8", fp8(lambda i: []), bundle=a.fp16_bundle, device=a.gpu)
                variant("gpu-fp8-controlnet", fp8(cn(fcn)), bundle=a.fp16_bundle, device=a.gpu)
                for st in a.styles:
                    variant(f"gpu-fp16-lora-{st}", lora(st, "sync"), bundle=a.fp16_bundle, device=a.gpu)
                    variant(f"gpu-fp8-lora-{st}", fp8(lora(st, "sync")), bundle=a.fp16_bundle, device=a.gpu)
        if a.split:
            variant("gpu-split", lambda i: ["--split-guidance", a.split], device=a.gpu)
            variant("gpu-split-controlnet", lambda i: ["--split-guidance", a.split, *cn(a.controlnet)(i)],
                     device=a.gpu)
    if a.service:
        service_variant(a, katz, samples, conds, img_dir, made, size)

    # ── scores ──
    import torch  # noqa: F401  (the judge)
    from shapes import judge as J

    jn = J.load_judge(a.judge) if a.judge else J.load_judge()
    imgs = {k: [read(p) for p in v] for k, v in made.items()}
    caps = [s.caption for s in samples]
    rows = []
    ref_of = {f"lora-{st}-async-K{k}": f"lora-{st}-sync" for st in a.styles for k in bounds}
    ref_of.update({"gpu-fp32": "base", "gpu-fp32-controlnet": "controlnet", "gpu-fp16": "gpu-fp32",
                   "gpu-fp16-controlnet": "gpu-fp32-controlnet", "gpu-split": "gpu-fp32",
                   "gpu-split-controlnet": "gpu-fp32-controlnet", "service-controlnet": "controlnet",
                   "gpu-fp8": "gpu-fp16", "gpu-fp8-controlnet": "gpu-fp16-controlnet"})
    ref_of.update({f"gpu-fp8-lora-{st}": f"gpu-fp16-lora-{st}" for st in a.styles})
    for name, ims in imgs.items():
        acc = J.prompt_accuracy(ims, caps, jn)
        row = {"variant": name, "prompt_accuracy": acc["prompt_accuracy"], "colours": acc["colours"],
               "shapes": acc["shapes"], "count": acc["count"], "background": acc["background"],
               "relation": acc["relation"]}
        if "controlnet" in name:
            row["controlnet_iou"] = float(np.mean([shapes.edge_iou(shapes.edge_map(im), s.edges)
                                                    for im, s in zip(ims, samples)]))
        for st in a.styles:
            if name.startswith(f"lora-{st}") or name.endswith(f"lora-{st}") or name == "base":
                row[f"style_{st}"] = float(np.mean([shapes.style_score(im, st) for im in ims]))
        ref = ref_of.get(name)
        if ref in imgs:
            row["vs"] = ref
            row["ssim"] = float(np.mean([ssim(x, y) for x, y in zip(ims, imgs[ref])]))
            row["rel_diff"] = float(np.mean([rel_diff(x, y) for x, y in zip(ims, imgs[ref])]))
        rows.append(row)
    # the dataset's own images, through the same judge (its ceiling)
    truth = J.prompt_accuracy([s.image for s in samples], caps, jn)
    report = {"n": a.n, "size": a.size, "steps": a.steps, "guidance": a.guidance, "bundle": str(a.bundle),
              "controlnet": str(a.controlnet), "lora_dir": str(a.lora_dir), "gpu": a.gpu, "split": a.split,
              "fp16_bundle": str(a.fp16_bundle) if a.fp16_bundle else None,
              "judge_on_dataset_images": truth["prompt_accuracy"], "rows": rows,
              "katz_calls": katz.calls, "katz_seconds": round(katz.seconds, 1), "jobs": a.jobs,
              "minutes": round((time.perf_counter() - t0) / 60, 2)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(a, report)
    grid(a.out / "grid.png", {k: v[:8] for k, v in imgs.items()}, [c for c in caps[:8]],
         [read(c) for c in conds[:8]])
    print((a.out / "report.md").read_text())


def service_variant(a, katz: Katz, samples, conds, img_dir: Path, made: dict, size: str):
    """The ControlNet through the service: a `katz controlnet-worker` and a `katz worker` (own
    queues, real RabbitMQ and Redis), jobs sent with `katz submit --wait`."""
    model = json.loads((a.controlnet / "bundle.json").read_text())["name"]
    base = json.loads((a.bundle / "bundle.json").read_text())["name"]
    tag = f"quality-{os.getpid()}"
    q, cq = f"katz.jobs.{tag}", f"katz.controlnet.{tag}"
    procs = [
        subprocess.Popen([katz.exe, "controlnet-worker", "--bundle", str(a.controlnet), "--base", str(a.bundle),
                          "--queue", cq, "--name", f"{tag}-cn"], env=katz.env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([katz.exe, "worker", "--bundle", str(a.bundle), "--queue", q, "--name", f"{tag}-w",
                          "--controlnet-service", f"{model}@{cq}", "--lora-dir", str(a.lora_dir)], env=katz.env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        paths = []
        (img_dir / "service-controlnet").mkdir(parents=True, exist_ok=True)
        for i, s in enumerate(samples):
            p = img_dir / "service-controlnet" / f"{i:03d}.png"
            katz.run("submit", "--base", base, "--queue", q, "--prompt", s.caption, "--seed", str(i),
                     "--steps", str(a.steps), "--guidance", str(a.guidance), "--size", size,
                     "--controlnet", f"{model}={conds[i]}:1.0", "--id", f"{tag}-{i}", "--wait", "--timeout-s", "300",
                     "--output", str(p))
            paths.append(p)
        made["service-controlnet"] = paths
        print(f"  service-controlnet: {len(paths)} images", flush=True)
    finally:
        for pr in procs:
            pr.terminate()
        for pr in procs:
            try:
                pr.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pr.kill()


def write_markdown(a, r: dict):
    f = lambda v: "—" if v is None or (isinstance(v, float) and v != v) else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    styles = [f"style_{st}" for st in a.styles]
    cols = ["variant", "prompt_accuracy", "colours", "shapes", "background", "relation", "controlnet_iou",
            *styles, "vs", "ssim", "rel_diff"]
    lines = [f"# Quality report: {r['bundle']}", "",
             f"{r['n']} captions of the shapes dataset (seed 777), {r['size']}², {r['steps']} Euler steps, "
             f"guidance {r['guidance']}; every image by the `katz` binary ({r['katz_calls']} runs, "
             f"{r['katz_seconds']} s"
             + (f" summed over {r['jobs']} at a time; {r['minutes']} min in all" if r.get("jobs", 1) > 1 else "")
             + "). The judge reads the dataset's own images at "
             f"{r['judge_on_dataset_images']:.2f} prompt accuracy (its ceiling).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in r["rows"]:
        lines.append("| " + " | ".join(f(row.get(c)) for c in cols) + " |")
    lines += ["", "`vs`: the exact variant this one is compared with (SSIM, relative difference; 1 and 0 "
              "when equal). `grid.png`: the first 8 captions, one row per variant, the conditioning edges first."]
    (a.out / "report.md").write_text("\n".join(lines) + "\n")


def grid(path: Path, rows: dict[str, list[np.ndarray]], captions: list[str], conds: list[np.ndarray]):
    from PIL import ImageDraw

    tile, label = 128, 170
    all_rows = [("edges (ControlNet)", conds), *rows.items()]
    w, h = label + tile * len(captions), (tile + 4) * len(all_rows) + 40
    g = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(g)
    for j, c in enumerate(captions):
        d.text((label + j * tile + 2, 2), c[:22], fill="black")
        d.text((label + j * tile + 2, 14), c[22:44], fill="black")
    for r, (name, ims) in enumerate(all_rows):
        y = 40 + r * (tile + 4)
        d.text((4, y + tile // 2), name, fill="black")
        for j, im in enumerate(ims):
            g.paste(Image.fromarray(im).resize((tile, tile)), (label + j * tile, y))
    g.save(path)


if __name__ == "__main__":
    main()
