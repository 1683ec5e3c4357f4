#!/usr/bin/env bash
# The dashboard's browser test: target/debug/switchyard (built by the test step before this
# one in .ci/run) with its bundled backends, REST traffic, and headless Chromium driven by
# playwright-core (pinned in package-lock.json). Installs Debian's chromium and the npm
# packages when they are missing; screenshots go to target/dashboard/.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ ! -x target/debug/switchyard ]; then
  echo "tests/dashboard: target/debug/switchyard is missing; build it first (cargo build, or the test step of .ci/run)" >&2
  exit 1
fi
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || {
  echo "tests/dashboard: node and npm are needed (Node 20 or later)" >&2
  exit 1
}

if [ ! -x /usr/bin/chromium ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null
fi

# npm ci when node_modules is missing or was installed from another package-lock.json.
dir=tests/dashboard
if ! cmp -s "$dir/package-lock.json" "$dir/node_modules/.switchyard-package-lock.json" 2>/dev/null; then
  (cd "$dir" && npm ci --no-audit --no-fund)
  cp "$dir/package-lock.json" "$dir/node_modules/.switchyard-package-lock.json"
fi

exec node "$dir/dashboard.test.mjs"
