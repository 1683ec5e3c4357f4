"""Triton's own load generator, perf_analyzer, against every shipped route through the
gateway, over gRPC and over HTTP. perf_analyzer reads a route's metadata and config,
loads it, and reads its statistics around every measurement window: it completes only
where all of them follow Triton (numeric versions, statistics under the name and version
it asks for, numbers in HTTP JSON).

The binary comes from tests/interop/perf_analyzer/install.sh (run.sh installs it and sets
PERF_ANALYZER to the wrapper)."""

import csv
import os
import pathlib
import re
import subprocess
import urllib.request

import pytest

ROUTES = ["digits", "digits-linear", "digits-cascade", "digits-ensemble", "digits-cached", "digits-pipeline", "digits-switch"]
# The gateway's protocol label for each perf_analyzer protocol.
PROTOCOLS = {"grpc": "grpc", "http": "rest"}
# Bounded runs: three stable windows of 500 ms are enough to show the load completes, and
# the loose stability bound keeps a busy 2-core machine from failing a run on jitter.
WINDOW_MS = 500
MAX_TRIALS = 4
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def perf_analyzer():
    path = os.environ.get("PERF_ANALYZER")
    if not path:
        pytest.fail("PERF_ANALYZER is not set: run tests/interop/run.sh, which installs perf_analyzer")
    if not os.access(path, os.X_OK):
        pytest.fail(f"PERF_ANALYZER={path} is not executable")
    return path


def requests_served(gateway, route, protocol):
    """Successful requests of `route` over `protocol` in the gateway's /metrics."""
    text = urllib.request.urlopen(f"http://{gateway.addrs['admin']}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("switchyard_requests_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.index("}")]))
        if labels.get("route") == route and labels.get("protocol") == protocol and labels.get("result") == "ok":
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("route", ROUTES)
def test_perf_analyzer_completes(perf_analyzer, gateway, tmp_path, route, protocol):
    url = gateway.addrs["grpc" if protocol == "grpc" else "http"]
    report = tmp_path / "report.csv"
    before = requests_served(gateway, route, PROTOCOLS[protocol])
    cmd = [
        perf_analyzer,
        "-m", route,
        "-u", url,
        "-i", protocol,
        "-b", "1",
        "--concurrency-range", "2",
        "--measurement-interval", str(WINDOW_MS),
        "--max-trials", str(MAX_TRIALS),
        "--stability-percentage", "100",
        "-f", str(report),
    ]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"perf_analyzer ran past {TIMEOUT_S}s on {route} over {protocol}:\n{e.stdout}\n{e.stderr}")
    out = f"{' '.join(cmd)}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert run.returncode == 0, out
    rows = list(csv.DictReader(report.open()))
    assert len(rows) == 1, out
    assert float(rows[0]["Inferences/Second"]) > 0, out
    served = requests_served(gateway, route, PROTOCOLS[protocol]) - before
    assert served > 0, f"the gateway counted no {PROTOCOLS[protocol]} requests of {route}\n{out}"
