#!/usr/bin/env bash
# Runs the interoperability suite: the official Triton Python clients against Switchyard
# processes (backend, gateway), and the gateway in front of a real Triton server.
# Creates its venvs from the pinned requirements (tritonclient; Triton's own wheel).
# Usage: tests/interop/run.sh [pytest args]   (SWITCHYARD_BIN overrides the binary path)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=$(realpath -m "${INTEROP_VENV:-$here/.venv}")
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
# The real Triton peer needs numpy<2: it gets a venv of its own.
triton_venv=$(realpath -m "${TRITON_VENV:-$here/triton/.venv}")
[ -x "$triton_venv/bin/python" ] || python3 -m venv "$triton_venv"
"$triton_venv/bin/pip" install -q --disable-pip-version-check -r "$here/triton/requirements.txt"
export TRITON_PYTHON="$triton_venv/bin/python"
export SWITCHYARD_BIN="${SWITCHYARD_BIN:-$root/target/debug/switchyard}"
[ -x "$SWITCHYARD_BIN" ] || { echo "no switchyard binary at $SWITCHYARD_BIN: run cargo build first" >&2; exit 1; }
cd "$here"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
