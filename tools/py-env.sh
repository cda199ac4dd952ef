#!/usr/bin/env bash
# Makes .katz/py, a venv with the pinned packages of tools/producer.py and the Python tests (PyPI):
# tools/requirements-producer.txt and tools/requirements-test.txt.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.katz/py
req=$(mktemp)
trap 'rm -f "$req"' EXIT
cat "$root/tools/requirements-producer.txt" "$root/tools/requirements-test.txt" > "$req"
if [[ ! -x $venv/bin/python ]] || ! cmp -s "$req" "$venv/.requirements"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$req"
  cp "$req" "$venv/.requirements"
fi
echo "$venv/bin/python"
