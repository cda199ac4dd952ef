#!/usr/bin/env bash
# Builds model bundles (tools/export_bundle.py) in a pinned Python venv made on first use.
#   tools/export.sh                                       tiny bundles, LoRAs, parity references
#   tools/export.sh --config sdxl --random-init --out bundles/sdxl
# env: KATZ_TOOLS_VENV (default .venv-tools in the repo), PYTHON (default python3)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${KATZ_TOOLS_VENV:-$root/.venv-tools}
if [[ ! -x $venv/bin/python ]] || ! cmp -s "$root/tools/requirements-export.txt" "$venv/.requirements"; then
  echo "export: installing the pinned exporter environment into $venv (torch, diffusers, onnx; a few minutes)" >&2
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$root/tools/requirements-export.txt"
  cp "$root/tools/requirements-export.txt" "$venv/.requirements"
fi
exec "$venv/bin/python" "$root/tools/export_bundle.py" "$@"
