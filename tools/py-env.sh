#!/usr/bin/env bash
# Makes .katz/py, a venv with the pinned packages of tools/producer.py and its test (PyPI).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.katz/py
req=$root/tools/requirements-producer.txt
if [[ ! -x $venv/bin/python ]] || ! cmp -s "$req" "$venv/.requirements"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r "$req"
  cp "$req" "$venv/.requirements"
fi
echo "$venv/bin/python"
