#!/usr/bin/env python3
"""Fits a bundle's latent → RGB preview projection (`preview_rgb` in bundle.json, docs/bundles.md).

    latents (scheduler space) ─/scaling_factor─▶ vae_decoder.onnx ─▶ RGB in [-1, 1] (H×W)
        ─8×8 mean─▶ RGB at latent resolution (h×w)
    least squares over every latent pixel:  rgb ≈ factors · latent + bias   (factors 3×C, bias 3)

The sample latents are those of real denoising runs: the per-step latents of the parity
references of the bundle's family (`tests/data/parity-shapes/*.safetensors`, `latents_<i>`,
diffusers' pipeline on the bundle's exact weights), from the middle step on (`--from`, a fraction
of the steps): earlier latents are mostly noise (their standard deviation is 9 at the first step,
1.6 at the middle one, 0.9 at the last of 20), which pulls a least-squares fit towards zero
factors and a grey preview. A worker projects the
latent it holds after a step with the result (katz-onnx `preview.rs`) and maps [-1, 1] to 8 bits
as the image is.

Runs with the test venv (numpy, onnxruntime: `tools/py-env.sh`):

    .katz/py/bin/python tools/fit_preview_projection.py \
        --bundle bundles/shapes/shapes-sdxl --refs tests/data/parity-shapes [--write]

Prints the fit's error (RMSE in [-1, 1] units and R² per channel, on all latents and on the last
step's); `--write` stores the result in the bundle's bundle.json as `preview_rgb`.
"""

import argparse
import glob
import json
import os
import struct

import numpy as np
import onnxruntime as ort


def read_safetensors(path):
    """name → numpy array (F32 / I64 tensors) of a safetensors file, without the safetensors package."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    kinds = {"F32": np.float32, "I64": np.int64, "F16": np.float16}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=kinds[meta["dtype"]]).reshape(meta["shape"])
    return out


def samples(refs_dir, start):
    """(latents [N,C,h,w], last [bool per latent]) of every case's steps from `start` (a fraction
    of the case's steps) on."""
    lats, last = [], []
    for path in sorted(glob.glob(os.path.join(refs_dir, "*.safetensors"))):
        t = read_safetensors(path)
        steps = sorted(int(k.split("_")[1]) for k in t if k.startswith("latents_"))
        for i in steps[int(start * len(steps)) :]:
            lats.append(t[f"latents_{i}"][0])
            last.append(i == steps[-1])
    if not lats:
        raise SystemExit(f"no latents_<i> tensors in {refs_dir}/*.safetensors")
    return np.stack(lats).astype(np.float32), np.array(last)


def decode(bundle_dir, manifest, lats):
    """RGB in [-1, 1] at latent resolution (the decoded image's 8×8 block means), [N,3,h,w]."""
    sess = ort.InferenceSession(
        os.path.join(bundle_dir, manifest["vae_decoder"]), providers=["CPUExecutionProvider"]
    )
    f = manifest["vae_scale_factor"]
    out = []
    for z in lats:
        img = sess.run(["image"], {"latent": (z / manifest["scaling_factor"])[None]})[0][0]
        c, hh, ww = img.shape
        out.append(img.reshape(c, hh // f, f, ww // f, f).mean(axis=(2, 4)))
    return np.stack(out)


def fit(lats, rgb):
    """factors [3,C], bias [3] minimising Σ‖factors·z + bias − rgb‖² over every latent pixel."""
    c = lats.shape[1]
    x = lats.transpose(0, 2, 3, 1).reshape(-1, c).astype(np.float64)
    y = rgb.transpose(0, 2, 3, 1).reshape(-1, 3).astype(np.float64)
    a = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    sol, *_ = np.linalg.lstsq(a, y, rcond=None)
    return sol[:c].T, sol[c]


def errors(factors, bias, lats, rgb):
    """(RMSE over all values, R² per channel) of the projection on these samples."""
    pred = np.einsum("kc,nchw->nkhw", factors, lats) + bias[None, :, None, None]
    res = pred - rgb
    rmse = float(np.sqrt((res**2).mean()))
    r2 = [
        float(1 - (res[:, k] ** 2).sum() / ((rgb[:, k] - rgb[:, k].mean()) ** 2).sum())
        for k in range(3)
    ]
    return rmse, r2


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="base bundle directory (its vae_decoder.onnx)")
    ap.add_argument("--refs", required=True, help="directory of parity references with latents_<i>")
    ap.add_argument("--from", dest="start", type=float, default=0.5,
                    help="first step fitted, as a fraction of each case's steps (default 0.5)")
    ap.add_argument("--write", action="store_true", help="store preview_rgb in the bundle's bundle.json")
    args = ap.parse_args()

    manifest_path = os.path.join(args.bundle, "bundle.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    lats, last = samples(args.refs, args.start)
    if lats.shape[1] != manifest["latent_channels"]:
        raise SystemExit(f"latents have {lats.shape[1]} channels, the bundle {manifest['latent_channels']}")
    rgb = decode(args.bundle, manifest, lats)
    factors, bias = fit(lats, rgb)
    rmse, r2 = errors(factors, bias, lats, rgb)
    rmse_last, r2_last = errors(factors, bias, lats[last], rgb[last])
    print(f"samples: {len(lats)} latents ({int(last.sum())} final), {lats.shape[1]} channels, "
          f"{lats.shape[2]}x{lats.shape[3]}")
    print(f"fit, steps fitted:  RMSE {rmse:.4f} (of [-1, 1]), R² R/G/B {r2[0]:.3f} {r2[1]:.3f} {r2[2]:.3f}")
    print(f"fit, last step:   RMSE {rmse_last:.4f}, R² R/G/B {r2_last[0]:.3f} {r2_last[1]:.3f} {r2_last[2]:.3f}")
    preview = {
        "factors": [[round(float(v), 5) for v in row] for row in factors],
        "bias": [round(float(v), 5) for v in bias],
    }
    print(json.dumps({"preview_rgb": preview}))
    if args.write:
        manifest["preview_rgb"] = preview
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
        print(f"wrote preview_rgb into {manifest_path}")


if __name__ == "__main__":
    main()
