#!/usr/bin/env bash
# Puts the pinned ONNX Runtime shared library where katz looks for it (.katz/ort/ in the repo).
# It comes from the onnxruntime wheel on PyPI (ort's own binary download cannot be reached here).
#   tools/fetch-onnxruntime.sh            idempotent; prints the library's path
# env: ORT_VERSION (default 1.31.1), KATZ_ORT_DIR (default .katz/ort in the repo)
set -euo pipefail
ver=${ORT_VERSION:-1.31.1}
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${KATZ_ORT_DIR:-$root/.katz/ort}
lib=$dir/libonnxruntime.so.$ver
if [[ ! -f $lib ]]; then
  echo "fetch-onnxruntime: downloading onnxruntime==$ver from PyPI" >&2
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$tmp" "onnxruntime==$ver"
  python3 - "$tmp" "$dir" "$ver" <<'PY'
import glob, os, sys, zipfile
tmp, dest, ver = sys.argv[1:]
whl = glob.glob(os.path.join(tmp, "onnxruntime-*.whl"))[0]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith("onnxruntime/capi/libonnxruntime") and ".so" in n:
            out = os.path.join(dest, os.path.basename(n))
            with z.open(n) as src, open(out + ".part", "wb") as dst:
                dst.write(src.read())
            os.replace(out + ".part", out)
PY
fi
[[ -f $lib ]] || { echo "fetch-onnxruntime: $lib missing after download" >&2; exit 1; }
ln -sf "libonnxruntime.so.$ver" "$dir/libonnxruntime.so"
echo "$lib"
