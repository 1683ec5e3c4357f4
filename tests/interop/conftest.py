"""Fixtures: Switchyard processes on ephemeral ports, and the sample held-out data."""

import json
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE_REPO = ROOT / "backends" / "model_repository"


class Process:
    """A switchyard subcommand that prints `... listening key=addr ...` once it serves."""

    def __init__(self, args):
        self.proc = subprocess.Popen(
            [os.environ.get("SWITCHYARD_BIN", str(ROOT / "target/debug/switchyard")), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        if "listening" not in line:
            self.proc.kill()
            raise RuntimeError(f"switchyard {' '.join(args)} did not start: {line!r}")
        self.addrs = dict(w.split("=", 1) for w in line.split() if "=" in w)

    def stop(self):
        self.proc.terminate()
        assert self.proc.wait(timeout=30) == 0, "switchyard exits 0 on SIGTERM"


@pytest.fixture(scope="session")
def holdout():
    return json.loads((ROOT / "backends" / "sample_data" / "digits_holdout.json").read_text())


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """A backend on a private copy of the sample repository (tests load and unload models)."""
    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    shutil.copytree(SAMPLE_REPO, repo)
    p = Process(["backend", "--model-repository", str(repo), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
    yield p
    p.stop()
