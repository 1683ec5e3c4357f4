#!/usr/bin/env bash
# Batch scoring, side by side in one run: `switchyard batch` against a Python tritonclient
# loop (synchronous, and asyncio at the same concurrency) and perf_analyzer's best
# throughput, all on digits_mlp served by one bundled backend. See compare.py.
#
# Usage: benches/batch/run.sh [--rows N] [--concurrency C] [--reps R]
# Env: INTEROP_VENV (default target/interop-venv) for tritonclient and numpy.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
venv=${INTEROP_VENV:-target/interop-venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/interop/requirements.txt
fi
PYTHON="$venv/bin/python" tests/interop/perf_analyzer/install.sh >/dev/null
cargo build --release --locked -q
"$venv/bin/python" benches/batch/compare.py target/release/switchyard tests/interop/perf_analyzer/perf_analyzer "$@"
