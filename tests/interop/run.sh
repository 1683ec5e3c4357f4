#!/usr/bin/env bash
# Runs the interoperability suite: the official Triton Python clients against Switchyard
# processes. Creates its own venv from the pinned requirements.
# Usage: tests/interop/run.sh [pytest args]   (SWITCHYARD_BIN overrides the binary path)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=$(realpath -m "${INTEROP_VENV:-$here/.venv}")
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt"
export SWITCHYARD_BIN="${SWITCHYARD_BIN:-$root/target/debug/switchyard}"
[ -x "$SWITCHYARD_BIN" ] || { echo "no switchyard binary at $SWITCHYARD_BIN: run cargo build first" >&2; exit 1; }
cd "$here"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
