"""Fixtures: Switchyard processes (backends, gateway) and a real Triton server on
ephemeral ports, and the sample held-out data."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE_REPO = ROOT / "backends" / "model_repository"


class Process:
    """A command that prints `... listening key=addr ...` once it serves."""

    def __init__(self, cmd):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
        line = self.proc.stdout.readline()
        if "listening" not in line:
            self.proc.kill()
            raise RuntimeError(f"{' '.join(map(str, cmd))} did not start: {line!r}")
        self.addrs = dict(w.split("=", 1) for w in line.split() if "=" in w)

    def stop(self):
        self.proc.terminate()
        assert self.proc.wait(timeout=60) == 0, "exits 0 on SIGTERM"


# The model-control token of the `backend` fixture (sent as `authorization: Bearer ...`).
CONTROL_TOKEN = "interop-model-control-token-9a41"


def switchyard(*args):
    return Process([os.environ.get("SWITCHYARD_BIN", str(ROOT / "target/debug/switchyard")), *args])


@pytest.fixture(scope="session")
def holdout():
    return json.loads((ROOT / "backends" / "sample_data" / "digits_holdout.json").read_text())


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """A backend on a private copy of the sample repository whose models the tests may
    load and unload: model control `explicit`, with CONTROL_TOKEN."""
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    shutil.copytree(SAMPLE_REPO, repo)
    token = repo.parent / "control-token"
    token.write_text(CONTROL_TOKEN + "\n")
    p = switchyard(
        "backend", "--model-repository", str(repo), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
        "--model-control-mode", "explicit", "--model-control-token-file", str(token),
    )
    yield p
    p.stop()


def start_gateway(tmp_path, pools, policies):
    """`switchyard gateway` with `pools` ({name: [addr]}) and `policies` ({file: text})."""
    (tmp_path / "policies").mkdir()
    for name, text in policies.items():
        (tmp_path / "policies" / name).write_text(text)
    lines = ["listen: { http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }", "policies: policies", "backends:"]
    for pool, addrs in pools.items():
        lines.append(f"  {pool}: {{ endpoints: {json.dumps(addrs)} }}")
    lines.append("reload: { watch: false }")
    (tmp_path / "gateway.yaml").write_text("\n".join(lines) + "\n")
    return switchyard("gateway", "--config", str(tmp_path / "gateway.yaml"))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The gateway with the shipped policies in front of two bundled backends (like `switchyard up`)."""
    stable = switchyard("backend", "--model-repository", str(SAMPLE_REPO), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
    canary = switchyard("backend", "--model-repository", str(SAMPLE_REPO), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
    policies = {p.name: p.read_text() for p in (ROOT / "policies").glob("*.yaml")}
    gw = start_gateway(tmp_path_factory.mktemp("gw"), {"stable": [stable.addrs["grpc"]], "canary": [canary.addrs["grpc"]]}, policies)
    yield gw
    gw.stop()
    stable.stop()
    canary.stop()


@pytest.fixture(scope="module")
def triton():
    """A real Triton Inference Server (nvidia-pytriton's tritonserver, python backend)."""
    python = os.environ.get("TRITON_PYTHON")
    if not python:
        pytest.fail("TRITON_PYTHON is not set: run tests/interop/run.sh, which builds the Triton venv")
    p = Process([python, str(ROOT / "tests" / "interop" / "triton" / "start_triton.py"), "--source", str(SAMPLE_REPO)])
    yield p
    p.stop()
