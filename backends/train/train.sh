#!/usr/bin/env bash
# Retrain the sample models reproducibly: a private venv from the pinned requirements.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv="${SWITCHYARD_TRAIN_VENV:-$here/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -r "$here/requirements.txt"
OMP_NUM_THREADS=1 "$venv/bin/python" "$here/train_digits.py"
