#!/usr/bin/env bash
# Runs the interoperability suite: the official Triton Python clients against Switchyard
# processes (backend, gateway), and the gateway in front of a real Triton server.
# Creates its venvs from the pinned requirements (tritonclient; Triton's own wheel) and
# installs Triton's perf_analyzer (tests/interop/perf_analyzer/install.sh).
# Usage: tests/interop/run.sh [pytest args]   (SWITCHYARD_BIN overrides the binary path;
# PERF_ANALYZER a perf_analyzer to use instead of installing one)
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
# Triton's perf_analyzer (a glibc 2.38 build) with its own loader and libraries, installed
# under target/ (PERF_ANALYZER_DIR overrides) unless PERF_ANALYZER names a binary already.
if [ -z "${PERF_ANALYZER:-}" ]; then
    PYTHON="$venv/bin/python" "$here/perf_analyzer/install.sh" >/dev/null
    export PERF_ANALYZER="$here/perf_analyzer/perf_analyzer"
fi
export SWITCHYARD_BIN="${SWITCHYARD_BIN:-$root/target/debug/switchyard}"
[ -x "$SWITCHYARD_BIN" ] || { echo "no switchyard binary at $SWITCHYARD_BIN: run cargo build first" >&2; exit 1; }
cd "$here"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
